"""Prompts and tokenization, exactly as lm-eval 0.4 builds and encodes them.

Following lm-eval (`api/task.py` `fewshot_context`/`construct_requests`, `models/huggingface.py`
`_encode_pair`/`tok_encode`) is what makes a native task score the same as the same data run as
an lm-eval task:

- plain text: context = maybe_delimit(system, description, "\\n\\n") + text; continuation =
  target_delimiter + answer (" " by default).
- chat template: the system prompt (system + description) is a system message, the text the user
  message, `add_generation_prompt=True`; the target delimiter becomes "" (lm-eval drops it).
- encoding: trailing whitespace of the context moves to the continuation; the whole string is
  encoded and split at the context's token length; special tokens (BOS) are added as the
  tokenizer's post-processor adds them, unless the string already starts with the BOS text.
"""

from __future__ import annotations

import re
import string
import unicodedata

import jinja2

# lm-eval's default `target_delimiter` and `fewshot_delimiter`.
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def maybe_delimit(prefix: str | None, suffix: str | None, delimiter: str = " ") -> str:
    """Join two strings, adding `delimiter` only when neither has whitespace at the boundary."""
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix
    return prefix + suffix if prefix[-1].isspace() or suffix[0].isspace() else prefix + delimiter + suffix


def uses_chat(tokenizer, chat: bool) -> bool:
    return bool(chat and getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, text: str, system: str | None = None, chat: bool = True, description: str = "") -> str:
    """The context string: through the tokenizer's chat template when it has one (and `chat`)."""
    system_prompt = maybe_delimit(system, description, FEWSHOT_DELIMITER)
    if not uses_chat(tokenizer, chat):
        return system_prompt + text
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.exceptions.TemplateError:  # as lm-eval: a template without a system role gets none
        if not system_prompt:
            raise
        return tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False)


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message (Llama 3's `<|eot_id|>`, Qwen's
    `<|im_end|>`), trailing whitespace dropped; "" without a template. A reference answer is
    scored with it, so a model that would run on past the answer loses probability."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    probe = "\u2603\u2603"  # text no template writes itself
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.exceptions.TemplateError:
        return ""
    return text.rsplit(probe, 1)[-1].rstrip() if probe in text else ""


def target_delimiter(tokenizer, chat: bool, delimiter: str | None = None) -> str:
    """lm-eval's delimiter between context and answer: "" under a chat template, else " "."""
    if uses_chat(tokenizer, chat):
        return ""
    return TARGET_DELIMITER if delimiter is None else delimiter


def lm_encode(tokenizer, text: str, special: bool | None = None) -> list[int]:
    """Token ids as lm-eval's `tok_encode`: special tokens unless the text starts with BOS."""
    if special is None:
        prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        bos = tokenizer.decode(prefix_id) if prefix_id is not None else None
        special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str, special: bool | None = None,
                move_whitespace: bool = True) -> tuple[list[int], list[int]]:
    """lm-eval's split: encode the whole string, cut it at the context's token length.

    As lm-eval, trailing whitespace of the context (a chat template's "\\n\\n") moves to the
    continuation and is scored with it; `move_whitespace=False` scores the continuation alone.
    """
    n_spaces = len(context) - len(context.rstrip()) if move_whitespace else 0
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = lm_encode(tokenizer, context + continuation, special)
    ctx_len = len(lm_encode(tokenizer, context, special))
    return whole[:ctx_len], whole[ctx_len:]


# ------------------------------------------------------------------ answers of generate tasks

_CJK_PUNCT = "。，、；：？！“”‘’（）《》〈〉【】「」『』〔〕…—～·．"
# Signs and separators inside numbers survive: -3, 3.5, 3/4.
_NUMBER_PUNCT = re.compile(r"(?<![\d.])-(?=\d)|(?<=\d)[./](?=\d)")


def normalize_answer(text: str) -> str:
    """Compare form of a short answer: NFKC (full-width -> half-width), lower case, no
    whitespace, no punctuation (ASCII, Unicode P*, and full-width Chinese), except a minus sign
    before a digit and a decimal point or fraction bar between digits; 1,000 -> 1000."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    keep = {m.start() for m in _NUMBER_PUNCT.finditer(text)}
    out = []
    for i, ch in enumerate(text):
        if ch.isspace():
            continue
        if i not in keep and (ch in string.punctuation or ch in _CJK_PUNCT or unicodedata.category(ch).startswith("P")):
            continue
        out.append(ch)
    return "".join(out)


def answer_metrics(prediction: str, answers: list[str]) -> dict[str, float]:
    """exact_match: the normalized prediction equals a normalized answer; contains: it holds one."""
    pred = normalize_answer(prediction)
    golds = [g for g in (normalize_answer(a) for a in answers) if g]
    return {
        "exact_match": float(any(pred == g for g in golds)),
        "contains": float(any(g in pred for g in golds)),
    }
