"""`EvalSuite`: score a live model on one split of a suite with forward passes only.

Everything that does not depend on the weights is done once in the constructor: prompts are
rendered through the chat template, tokenized, sorted by length and packed into fixed batches
with the gather indices for the scored positions. `score(model)` then runs one forward pass per
batch under `torch.inference_mode()` and applies the output head only where a log-probability is
needed, so the same suite can score hundreds of merged candidates cheaply.

Semantics:
- choice: log-likelihood of each option as the continuation of the prompt (lm-eval's
  `loglikelihood`: whole string encoded, split at the context length; log-softmax in fp32);
  the highest wins, ties to the first option. `acc` as lm-eval; `acc_norm` divides each
  option's log-likelihood by its length in characters.
- reference: mean per-token log-probability of the reference answer given the prompt
  (`logprob`), and a bounded score `prob` = exp(logprob) in (0, 1], the per-token geometric
  mean probability, used for aggregation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evaluation.errors import EvalError
from evaluation.tasks import Suite, Task

# The metric of each kind that enters the suite score.
PRIMARY_METRIC = {"choice": "acc", "reference": "prob"}


@dataclass
class SuiteResult:
    score: float  # weighted mean of each task's primary metric
    tasks: dict[str, dict[str, float]]  # task -> metric -> value

    def as_dict(self) -> dict:
        return {"score": self.score, "tasks": self.tasks}


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [T] flat indices into B*L of the positions predicting a target
    targets: torch.Tensor  # [T] token ids
    sequences: torch.Tensor  # [T] global sequence index each target belongs to


def render_prompt(tokenizer, text: str, system: str | None = None, chat: bool = True) -> str:
    """The prompt string: through the tokenizer's chat template when it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{system}\n\n{text}" if system else text


def encode_pair(tokenizer, context: str, continuation: str, special: bool) -> tuple[list[int], list[int]]:
    """lm-eval's split: encode the whole string, cut it at the context's token length."""
    whole = tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
    ctx_len = len(tokenizer(context, add_special_tokens=special)["input_ids"])
    return whole[:ctx_len], whole[ctx_len:]


class EvalSuite:
    """One split of a suite, tokenized once, scored on any model that shares the tokenizer."""

    def __init__(
        self,
        suite: Suite,
        tokenizer,
        split: str,
        *,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        chat: bool = True,
        system: str | None = None,
        max_length: int | None = None,
    ):
        if batch_size < 1:
            raise EvalError(f"batch_size must be at least 1 but got {batch_size}")
        self.suite, self.split, self.device = suite, split, torch.device(device)
        self.tasks: list[Task] = suite.tasks
        chat = chat and bool(getattr(tokenizer, "chat_template", None))
        # A rendered chat template carries its own BOS text; plain prompts get the tokenizer's.
        special = not chat
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

        seqs: list[tuple[list[int], int]] = []  # (tokens, number of scored tail tokens)
        self._layout: list[tuple[Task, list[dict], int]] = []  # task, items, first sequence index
        self._option_chars: list[int] = []  # per sequence, for acc_norm
        for task in self.tasks:
            items = task.items(split)
            self._layout.append((task, items, len(seqs)))
            for item in items:
                if task.kind == "choice":
                    ctx = render_prompt(tokenizer, item["question"], system, chat)
                    conts = item["choices"]
                else:
                    ctx = render_prompt(tokenizer, item["prompt"], system, chat)
                    conts = [item["reference"]]
                for cont in conts:
                    c, r = encode_pair(tokenizer, ctx, cont, special)
                    if not c or not r:
                        raise EvalError(
                            f"{task.files[split]}: item {item['id']!r}: empty "
                            f"{'prompt' if not c else 'answer'} after tokenization"
                        )
                    toks = c + r
                    if max_length and len(toks) > max_length:
                        toks = toks[-max_length:]  # keep the scored tail; drop the oldest context
                    seqs.append((toks, len(r)))
                    self._option_chars.append(len(cont))
        self.n_sequences = len(seqs)
        self._n_tokens = torch.tensor([r for _, r in seqs], dtype=torch.float64)
        self._batches = self._pack(seqs, batch_size, pad_id)

    def _pack(self, seqs, batch_size: int, pad_id: int) -> list[_Batch]:
        # Longest first so the first batch shows the peak memory at once; similar lengths share
        # a batch, so little compute goes to padding.
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        batches = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = len(seqs[idx[0]][0])
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            pos, tgt, seq = [], [], []
            for row, i in enumerate(idx):
                toks, n = seqs[i]
                ids[row, : len(toks)] = torch.tensor(toks)
                mask[row, : len(toks)] = 1
                for j in range(len(toks) - n, len(toks)):
                    pos.append(row * width + j - 1)  # logits at j-1 predict token j
                    tgt.append(toks[j])
                    seq.append(i)
            batches.append(
                _Batch(
                    ids.to(self.device),
                    mask.to(self.device),
                    torch.tensor(pos, device=self.device),
                    torch.tensor(tgt, device=self.device),
                    torch.tensor(seq, device=self.device),
                )
            )
        return batches

    @torch.inference_mode()
    def sequence_logprobs(self, model) -> torch.Tensor:
        """Summed log-probability of every scored continuation, float64 [n_sequences] on CPU."""
        body = getattr(model, "base_model", None)
        head = model.get_output_embeddings() if body is not None and body is not model else None
        totals = torch.zeros(self.n_sequences, dtype=torch.float64, device=self.device)
        for b in self._batches:
            if head is not None:
                # Hidden states everywhere, the (vocab-sized) head only at the scored positions.
                hidden = body(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
                logits = head(hidden.reshape(-1, hidden.shape[-1])[b.positions])
            else:
                out = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                logits = out.reshape(-1, out.shape[-1])[b.positions]
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(1, b.targets[:, None])[:, 0]
            totals.index_add_(0, b.sequences, picked.double())
        return totals.cpu()

    def score(self, model) -> SuiteResult:
        """Score `model` (any causal LM sharing the tokenizer) on this split."""
        lp = self.sequence_logprobs(model)
        chars = torch.tensor(self._option_chars, dtype=torch.float64)
        results: dict[str, dict[str, float]] = {}
        for task, items, first in self._layout:
            if task.kind == "choice":
                correct = correct_norm = 0
                pos = first
                for item in items:
                    k = len(item["choices"])
                    opts = lp[pos : pos + k]
                    # torch.argmax returns the first maximal index: ties go to the first option.
                    correct += int(torch.argmax(opts)) == item["answer"]
                    correct_norm += int(torch.argmax(opts / chars[pos : pos + k])) == item["answer"]
                    pos += k
                results[task.name] = {"acc": correct / len(items), "acc_norm": correct_norm / len(items)}
            else:
                n = len(items)
                mean_lp = lp[first : first + n] / self._n_tokens[first : first + n]
                results[task.name] = {
                    "logprob": float(mean_lp.mean()),
                    "prob": float(torch.exp(mean_lp).mean()),
                }
        total_w = sum(t.weight for t in self.tasks)
        score = sum(t.weight * results[t.name][PRIMARY_METRIC[t.kind]] for t in self.tasks) / total_w
        if not math.isfinite(score):
            raise EvalError(f"suite {self.suite.name!r}: the model produced a non-finite score")
        return SuiteResult(score=score, tasks=results)
