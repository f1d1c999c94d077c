"""`generate` tasks: greedy decoding of short answers, scored by exact match and containment.

Prompts are tokenized and left-padded into fixed batches once (`GenBatch`); each call decodes
greedily up to the task's `max_new_tokens`, stopping a row at EOS or at any stop string, and cuts
the text at the first stop string (as lm-eval's `generate_until` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList


@dataclass
class GenBatch:
    input_ids: torch.Tensor  # [B, L], left-padded
    attention_mask: torch.Tensor  # [B, L]
    examples: list[tuple[int, int]]  # (task index, item index) per row
    max_new_tokens: int
    stop: tuple[str, ...]


def pack_prompts(prompts: list[list[int]], examples: list[tuple[int, int]], batch_size: int, pad_id: int,
                 max_new_tokens: int, stop: tuple[str, ...], device: torch.device) -> list[GenBatch]:
    """Fixed batches of left-padded prompts, longest first, built once."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), prompts[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = len(prompts[idx[0]])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        batches.append(GenBatch(ids.to(device), mask.to(device), [examples[i] for i in idx], max_new_tokens, stop))
    return batches


class _StopStrings(StoppingCriteria):
    """Per row: done once the generated text holds a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    for s in stop:
        text = text.split(s, 1)[0]
    return text.strip()


@torch.inference_mode()
def generate(model, tokenizer, batch: GenBatch, pad_id: int) -> list[str]:
    """Greedy continuations of one batch, cut at the first stop string and stripped."""
    eos = tokenizer.eos_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=batch.max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id)
    width = batch.input_ids.shape[1]
    criteria = StoppingCriteriaList([_StopStrings(tokenizer, batch.stop, width)]) if batch.stop else None
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         generation_config=config, stopping_criteria=criteria)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [cut_at_stop(t, batch.stop) for t in texts]
