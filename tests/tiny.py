"""Tiny random Llama models and a tiny chat tokenizer, saved as Hugging Face folders, for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz一二三四五六七八九十大小是的？。 ")
SPECIAL = ["<|pad|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "\n"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=len(SPECIAL) + len(CHARS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tiny_model(path: Path, seed: int, dtype=torch.float32, **config) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config)).to(dtype)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_family(root: Path, n: int = 3, dtype=torch.float32, **config) -> list[Path]:
    return [save_tiny_model(root / f"m{i}", seed=i, dtype=dtype, **config) for i in range(n)]
