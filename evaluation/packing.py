"""Rows, batches and forward passes for log-likelihood scoring.

A row is the trie of the inputs (context + option, last token dropped) of an item's options: the
context is computed once for all its options. Each token attends to its ancestors in the trie and
sits at its depth as position id, which is exactly what it would see on a row of its own (causal
attention), so every option's log-likelihood is the one it gets scored alone, as in lm-eval. A
row that is a plain chain needs no mask; a batch of chains runs with no mask at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evaluation.errors import EvalError

# (input tokens, parent node per token (-1: root), scored entries (sequence, nodes, targets))
Row = tuple[list[int], list[int], list[tuple[int, list[int], list[int]]]]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], right-padded
    positions: torch.Tensor  # [U] distinct flat indices into B*L whose logits are needed
    gather: torch.Tensor  # [T] index into `positions` of each target
    targets: torch.Tensor  # [T] token ids
    sequences: torch.Tensor  # [T] global sequence index each target belongs to
    mask: torch.Tensor | None = None  # [B, 1, L, L] bool (True: attend), only for trie rows
    position_ids: torch.Tensor | None = None  # [B, L], only with `mask`


def _trie(options: list[tuple[int, list[int], list[int]]]) -> Row:
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}
    entries = []
    for seq, inp, targets in options:
        node, path = -1, []
        for tok in inp:
            if (node, tok) not in child:
                child[node, tok] = len(tokens)
                tokens.append(tok)
                parents.append(node)
            node = child[node, tok]
            path.append(node)
        entries.append((seq, path[len(inp) - len(targets):], targets))
    return tokens, parents, entries


def build_rows(items: list[list[tuple[int, list[int], list[int]]]], share: bool) -> list[Row]:
    """Rows for items, each a list of options (sequence index, input tokens, scored tail targets):
    one trie row per item when `share`, else one row per option.

    (Tries over several items, sharing a chat template or an instruction, were tried: fewer
    tokens, but the longer masked rows cost as much attention as they saved on the CPU.)
    """
    return [_trie(options) for options in items] if share else [_trie([o]) for opts in items for o in opts]


def _is_chain(parents: list[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def _tree_mask(parents: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor-or-self mask [width, width] and depths [width]; padding attends to itself."""
    mask = torch.eye(width, dtype=torch.bool)
    depth = torch.zeros(width, dtype=torch.long)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    return mask, depth


def pack_rows(rows: list[Row], batch_size: int, pad_id: int, device: torch.device) -> list[Batch]:
    """Fixed batches, longest rows first (as lm-eval: the first batch shows the peak memory, and
    similar lengths share a batch, so little compute goes to padding). Built once."""
    rows = sorted(rows, key=lambda r: (-len(r[0]), r[0]))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = len(chunk[0][0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        uniq: dict[int, int] = {}
        gather, tgt, seq = [], [], []
        for r, (toks, _, entries) in enumerate(chunk):
            ids[r, : len(toks)] = torch.tensor(toks)
            for s, nodes, targets in entries:
                for node, t in zip(nodes, targets):
                    gather.append(uniq.setdefault(r * width + node, len(uniq)))
                    tgt.append(t)
                    seq.append(s)
        mask = position_ids = None
        if not all(_is_chain(parents) for _, parents, _ in chunk):
            trees = [_tree_mask(parents, width) for _, parents, _ in chunk]
            mask = torch.stack([m for m, _ in trees])[:, None].to(device)
            position_ids = torch.stack([d for _, d in trees]).to(device)
        index = [torch.tensor(x, dtype=torch.long, device=device) for x in (list(uniq), gather, tgt, seq)]
        batches.append(Batch(ids.to(device), *index, mask=mask, position_ids=position_ids))
    return batches


def split_head(model):
    """(body, head) to apply the output head only where needed, or (None, None) to run the model
    whole (a model that scales or caps its logits after the head)."""
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    if body is None or body is model or head is None:
        return None, None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None, None
    return body, head


def _mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "eager":  # additive
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise EvalError(f"attention {impl!r} takes no custom mask: build the EvalSuite with share_context=False")


@torch.inference_mode()
def run_batches(model, batches: list[Batch], totals: torch.Tensor) -> None:
    """Add each scored target's log-probability (fp32 log-softmax) to its sequence's total."""
    body, head = split_head(model)
    for b in batches:
        kw = {"use_cache": False}
        if b.mask is not None:  # trie rows: each token sees its ancestors, at its depth
            kw.update(attention_mask=_mask_for(model, b.mask), position_ids=b.position_ids)
        # Without a mask: rows are right-padded and attention is causal, so padding is never seen.
        if head is not None:
            # Hidden states everywhere, the (vocab-sized) head only at the scored positions.
            hidden = body(input_ids=b.input_ids, **kw).last_hidden_state
            logits = head(hidden.reshape(-1, hidden.shape[-1])[b.positions])
        else:
            out = model(input_ids=b.input_ids, **kw).logits
            logits = out.reshape(-1, out.shape[-1])[b.positions]
        logp = torch.log_softmax(logits.float(), dim=-1)
        totals.index_add_(0, b.sequences, logp[b.gather, b.targets].double())
