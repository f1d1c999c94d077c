"""Rows, batches and forward passes for log-likelihood scoring.

A row is the trie of the inputs (context + option, last token dropped) of an item's options: the
context is computed once for all its options. Each token attends to its ancestors in the trie and
sits at its depth as position id, which is exactly what it would see on a row of its own (causal
attention), so every option's log-likelihood is the one it gets scored alone, as in lm-eval. A
row that is a plain chain needs no mask; a batch of chains runs with no mask at all.

What rows begin with in common (a chat template, a system prompt, a task's instruction, a C-Eval
description) is their shared prefix: those tokens go, once each, into one more trie row (the
`Prefix`), run first on each call with its KV cache kept. A row then runs only its own tokens,
attending to the cached keys and values of its prefix path, at the positions the tokens have in
the whole row: the same inputs as the whole row, with the shared part computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evaluation.errors import EvalError

# (input tokens, parent node per token (-1: root), scored entries (sequence, nodes, targets))
Row = tuple[list[int], list[int], list[tuple[int, list[int], list[int]]]]

# A row shares its first tokens when at least this many are also another row's first tokens.
MIN_PREFIX = 4
# The most tokens the prefix row may hold: its keys and values stay resident during a call (2048
# tokens of an 8B Llama-3: ~0.27 GB in bf16) and its mask is N x N. Past it, prefixes keep only
# what the most rows share (a template, an instruction) and drop what few rows share (a passage).
MAX_PREFIX_ROW = 2048


@dataclass
class Prefix:
    input_ids: torch.Tensor  # [1, N] every shared prefix token once, as one trie row
    mask: torch.Tensor  # [1, 1, N, N] ancestor-or-self
    position_ids: torch.Tensor  # [1, N] depth in the trie
    span: int  # highest position + 1 (checked against a sliding window)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], right-padded (each row without its shared prefix)
    positions: torch.Tensor  # [U] distinct flat indices into B*L whose logits are needed
    gather: torch.Tensor  # [T] index into `positions` of each target
    targets: torch.Tensor  # [T] token ids
    sequences: torch.Tensor  # [T] global sequence index each target belongs to
    mask: torch.Tensor | None = None  # [B, 1, L, P+L] bool (True: attend), for trie rows or prefixes
    position_ids: torch.Tensor | None = None  # [B, L], with `mask`
    prefix_nodes: torch.Tensor | None = None  # [B, P] each row's prefix path in the `Prefix` row
    span: int = 0  # highest position + 1 with `mask` (checked against a sliding window)


def _trie_paths(seqs: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """The trie of token sequences as (tokens, parent per token (-1: root), each sequence's nodes)."""
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}
    paths = []
    for seq in seqs:
        node, path = -1, []
        for tok in seq:
            if (node, tok) not in child:
                child[node, tok] = len(tokens)
                tokens.append(tok)
                parents.append(node)
            node = child[node, tok]
            path.append(node)
        paths.append(path)
    return tokens, parents, paths


def _trie(options: list[tuple[int, list[int], list[int]]]) -> Row:
    tokens, parents, paths = _trie_paths([inp for _, inp, _ in options])
    entries = [(seq, path[len(inp) - len(targets):], targets) for (seq, inp, targets), path in zip(options, paths)]
    return tokens, parents, entries


def build_rows(items: list[list[tuple[int, list[int], list[int]]]], share: bool) -> list[Row]:
    """Rows for items, each a list of options (sequence index, input tokens, scored tail targets):
    one trie row per item when `share`, else one row per option.

    (Tries over several items were tried: fewer tokens, but the longer masked rows cost as much
    attention as they saved on the CPU. What items begin with in common is shared as a prefix
    instead: see `pack_rows`.)
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


def _shareable(row: Row) -> int:
    """How many leading tokens of a row may go into a prefix: a chain (each token the child of the
    one before) that every later token descends from whole, holding no scored position."""
    tokens, parents, entries = row
    n = min(min(nodes) for _, nodes, _ in entries)  # a prefix position's logits are never computed
    for i in range(1, len(tokens)):
        if parents[i] != i - 1:  # a branch: the prefix ends at or before the node it hangs from
            n = min(n, parents[i] + 1)
    return n


def _prefix_lengths(rows: list[Row]) -> list[int]:
    """Per row, its longest shareable start that another row starts with too (0: none). In sorted
    order the longest common start of a row with any other is the one with a neighbour."""
    cap = [_shareable(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    n = [0] * len(rows)
    for a, b in zip(order, order[1:]):
        ta, tb, k, m = rows[a][0], rows[b][0], 0, min(cap[a], cap[b])
        while k < m and ta[k] == tb[k]:
            k += 1
        n[a], n[b] = max(n[a], k), max(n[b], k)
    n = [k if k >= MIN_PREFIX else 0 for k in n]
    _, _, paths = _trie_paths([toks[:k] for (toks, _, _), k in zip(rows, n)])
    uses: dict[int, int] = {}
    for path in paths:
        for node in path:
            uses[node] = uses.get(node, 0) + 1
    least = 1  # keep the nodes that at least this many rows go through (uses only fall along a path)
    while sum(u >= least for u in uses.values()) > MAX_PREFIX_ROW:
        least = min(u for u in uses.values() if u >= least) + 1
    if least > 1:
        n = [sum(uses[node] >= least for node in path) for path in paths]
        n = [k if k >= MIN_PREFIX else 0 for k in n]
    return n


def pack_rows(rows: list[Row], batch_size: int, pad_id: int, device: torch.device,
              share_prefix: bool = False) -> tuple[list[Batch], Prefix | None]:
    """Fixed batches, longest rows first (as lm-eval: the first batch shows the peak memory, and
    similar lengths share a batch, so little compute goes to padding), and the shared prefix row
    when `share_prefix` finds one. Built once."""
    lengths = _prefix_lengths(rows) if share_prefix else [0] * len(rows)
    prefix, paths = _prefix_row(rows, lengths, device)
    rows = [(t[n:], [p - n for p in ps[n:]], [(s, [x - n for x in nodes], tg) for s, nodes, tg in es])
            for (t, ps, es), n in zip(rows, lengths)]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), rows[i][0]))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [rows[i] for i in idx]
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
        n_pre = max(lengths[i] for i in idx)
        mask = position_ids = nodes = None
        span = 0
        if n_pre or not all(_is_chain(parents) for _, parents, _ in chunk):
            trees = [_tree_mask(parents, width) for _, parents, _ in chunk]
            mask = torch.stack([m for m, _ in trees])[:, None]
            position_ids = torch.stack([d for _, d in trees])
            if n_pre:  # each row sees its own prefix path, and its tokens sit after it
                seen = torch.arange(n_pre)[None] < torch.tensor([lengths[i] for i in idx])[:, None]
                mask = torch.cat([seen[:, None, None, :].expand(-1, 1, width, -1), mask], dim=-1)
                position_ids += torch.tensor([lengths[i] for i in idx])[:, None]
                nodes = torch.tensor([paths[i] + [0] * (n_pre - len(paths[i])) for i in idx]).to(device)
            span = int(position_ids.max()) + 1  # once here, not a device sync per call
            mask, position_ids = mask.to(device), position_ids.to(device)
        index = [torch.tensor(x, dtype=torch.long, device=device) for x in (list(uniq), gather, tgt, seq)]
        batches.append(Batch(ids.to(device), *index, mask=mask, position_ids=position_ids, prefix_nodes=nodes,
                             span=span))
    return batches, prefix


def _prefix_row(rows: list[Row], lengths: list[int], device) -> tuple[Prefix | None, list[list[int]]]:
    """The trie of the rows' prefixes as one row, and each row's path of nodes in it."""
    tokens, parents, paths = _trie_paths([toks[:n] for (toks, _, _), n in zip(rows, lengths)])
    if not tokens:
        return None, paths
    mask, depth = _tree_mask(parents, len(tokens))
    return Prefix(torch.tensor([tokens], device=device), mask[None, None].to(device), depth[None].to(device),
                  int(depth.max()) + 1), paths


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


def _cache_arg(fn) -> str:
    """The name a model's forward takes its KV cache by (`cache` from transformers 5.x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _kv_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]  # legacy tuples


def _prefix_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], nodes: torch.Tensor):
    """A fresh cache holding, for each row, the keys and values of its prefix path [B, P]."""
    from transformers import DynamicCache

    flat = nodes.flatten()
    data = [tuple(x[0].index_select(1, flat).unflatten(1, nodes.shape).transpose(0, 1) for x in pair)
            for pair in kv]
    try:
        return DynamicCache(ddp_cache_data=data)
    except TypeError:  # transformers < 4.48
        return DynamicCache.from_legacy_cache(tuple(data))


def _check_window(model, span: int) -> None:
    """Custom masks replace a model's sliding-window masks: refuse rows that would need the window."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return
    if span > window:
        raise EvalError(f"rows of {span} tokens exceed the model's sliding window of "
                        f"{window}: build the EvalSuite with share_context=False")


@torch.inference_mode()
def run_batches(model, batches: list[Batch], totals: torch.Tensor, prefix: Prefix | None = None,
                on_batch=None) -> None:
    """Add each scored target's log-probability (fp32 log-softmax) to its sequence's total;
    `on_batch()` after each batch (a progress bar)."""
    accumulate_logprobs(model, batches, totals, prefix, on_batch)


def accumulate_logprobs(model, batches: list[Batch], totals: torch.Tensor, prefix: Prefix | None = None,
                        on_batch=None) -> None:
    """`run_batches` in the caller's grad mode: with gradients on, `totals` becomes differentiable
    in the model's parameters (the learner's loss, search/learn.py)."""
    body, head = split_head(model)
    net = body if head is not None else model
    kv = None
    if prefix is not None:  # once per call: the keys and values every row's prefix path reads
        _check_window(model, prefix.span)
        arg = _cache_arg(net.forward)
        out = net(input_ids=prefix.input_ids, attention_mask=_mask_for(model, prefix.mask),
                  position_ids=prefix.position_ids, use_cache=True)
        kv = _kv_pairs(out.cache if arg == "cache" else out.past_key_values)
    for b in batches:
        kw = {"use_cache": False}
        if b.mask is not None:  # trie rows: each token sees its ancestors, at its depth
            _check_window(model, b.span)
            kw.update(attention_mask=_mask_for(model, b.mask), position_ids=b.position_ids)
        if b.prefix_nodes is not None:
            kw.update({arg: _prefix_cache(kv, b.prefix_nodes), "use_cache": True})
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
        if on_batch is not None:
            on_batch()
