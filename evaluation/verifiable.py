"""`verifiable` tasks: instruction following checked by code, in the spirit of IFEval, for Chinese.

    {"id": "verifiable-0001", "prompt": "用不超过40个字介绍长城，回答必须以“长城”开头。",
     "checks": [{"type": "max_chars", "n": 40}, {"type": "starts_with", "phrase": "长城"}]}

The model answers greedily; every constraint of the item is checked on the answer by one small
function of `CHECKS` (type -> `check(response, **kwargs) -> bool`). Metrics, named as IFEval's:
- `prompt_level_strict_acc`: 1 when every check of the item passes on the answer as generated;
- `inst_level_strict_acc`: the share of all checks that pass, pooled over the items as IFEval
  and lm-eval do (per item: the share of its checks; the task mean weights it by its checks);
- `prompt_level_loose_acc`, `inst_level_loose_acc`: the same, where a check passes when it passes
  on any of the answer's loose variants (IFEval's: the first line dropped, the last line dropped,
  both, and each of those with markdown emphasis `*` removed).

Characters are counted without whitespace, punctuation included. An empty answer fails every
check (IFEval lets it pass the negative ones, such as "no commas"). "Stripped" means leading and
trailing whitespace removed. Traditional-only characters are found with OpenCC's t2s conversion
(a maintained converter, not a hand-made table).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache

_WS = re.compile(r"\s+")
_LATIN = re.compile(r"[A-Za-zＡ-Ｚａ-ｚ]")
_DIGIT = re.compile(r"[0-9０-９]")
_HALF_PUNCT = set(",.!?;:()[]\"'")
_SENTENCE_END = re.compile(r"[。！？!?]+")
_LIST_MARKER = re.compile(
    r"^(?:[0-9０-９]+\s*[.、)）．](?![0-9０-９])|[（(][0-9０-９]+[）)]|[-*•·]|[一二三四五六七八九十]+、)")
_PLACEHOLDER = re.compile(r"\[[^\[\]\s][^\[\]]*\]")
_BLANK_LINE = re.compile(r"\n[ \t\u3000]*\n")


def n_chars(text: str) -> int:
    """Characters without any whitespace (full-width spaces too), punctuation included."""
    return len(_WS.sub("", text))


@lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def traditional_chars(text: str) -> list[str]:
    """The characters of `text` that OpenCC's t2s conversion changes (traditional-only forms)."""
    converted = _t2s().convert(text)
    if len(converted) != len(text):  # phrase conversion changed the length: compare per character
        return [c for c in text if _t2s().convert(c) != c]
    return [a for a, b in zip(text, converted) if a != b]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def max_chars(response: str, n: int) -> bool:
    return n_chars(response) <= n


def min_chars(response: str, n: int) -> bool:
    return n_chars(response) >= n


def exact_chars(response: str, n: int) -> bool:
    return n_chars(response) == n


def contains(response: str, words: list[str]) -> bool:
    return all(w in response for w in words)


def excludes(response: str, words: list[str]) -> bool:
    return not any(w in response for w in words)


def starts_with(response: str, phrase: str) -> bool:
    return response.strip().startswith(phrase)


def ends_with(response: str, phrase: str) -> bool:
    return response.strip().endswith(phrase)


def line_count(response: str, n: int) -> bool:
    return len(_lines(response)) == n


def list_items(response: str, n: int) -> bool:
    return sum(bool(_LIST_MARKER.match(line.strip())) for line in _lines(response)) == n


def sentence_count(response: str, n: int) -> bool:
    pieces = _SENTENCE_END.split(response.strip())
    return sum(bool(p.strip()) for p in pieces) == n


def paragraphs(response: str, n: int) -> bool:
    parts = _BLANK_LINE.split(response.strip().replace("\r\n", "\n"))
    return sum(bool(p.strip()) for p in parts) == n


def json_keys(response: str, keys: list[str]) -> bool:
    try:
        obj = json.loads(response.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


def simplified_only(response: str) -> bool:
    return not _LATIN.search(response) and not traditional_chars(response)


def fullwidth_punct(response: str) -> bool:
    for i, c in enumerate(response):
        if c in _HALF_PUNCT:
            between_digits = (c in ".:" and 0 < i < len(response) - 1
                              and response[i - 1].isdigit() and response[i + 1].isdigit())
            if not between_digits:
                return False
    return True


def wrapped(response: str, left: str, right: str) -> bool:
    text = response.strip()
    return len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right)


def one_of(response: str, options: list[str]) -> bool:
    text = response.strip()
    if text.endswith(("。", ".")):
        text = text[:-1].rstrip()
    return text in options


def placeholders(response: str, n: int) -> bool:
    return len(_PLACEHOLDER.findall(response)) >= n


def word_count(response: str, word: str, n: int) -> bool:
    return response.count(word) >= n


def repeat_first(response: str, text: str) -> bool:
    body = response.strip()
    return body.startswith(text) and bool(body[len(text):].strip())


def no_digits(response: str) -> bool:
    return not _DIGIT.search(response)


CHECKS: dict[str, Callable[..., bool]] = {f.__name__: f for f in (
    max_chars, min_chars, exact_chars, contains, excludes, starts_with, ends_with, line_count, list_items,
    sentence_count, paragraphs, json_keys, simplified_only, fullwidth_punct, wrapped, one_of, placeholders,
    word_count, repeat_first, no_digits,
)}

# The arguments each check takes (for the data loader's one-line errors).
ARGS: dict[str, tuple[str, ...]] = {
    name: tuple(f.__code__.co_varnames[1:f.__code__.co_argcount]) for name, f in CHECKS.items()}


def check_spec(check: dict) -> str | None:
    """What is wrong with one check of an item (None when it is well-formed)."""
    if not isinstance(check, dict) or "type" not in check:
        return "each check must be an object with a 'type'"
    kind = check["type"]
    if kind not in CHECKS:
        return f"unknown check type {kind!r}; known: {', '.join(CHECKS)}"
    given, wanted = set(check) - {"type"}, set(ARGS[kind])
    if given != wanted:
        return f"check {kind!r} takes {sorted(wanted) or 'no arguments'} but got {sorted(given) or 'none'}"
    for key in wanted & {"n"}:
        if not isinstance(check[key], int) or isinstance(check[key], bool) or check[key] < 0:
            return f"check {kind!r}: n must be a non-negative integer but got {check[key]!r}"
    for key in wanted & {"words", "keys", "options"}:
        if not isinstance(check[key], list) or not check[key] or not all(isinstance(w, str) and w for w in check[key]):
            return f"check {kind!r}: {key} must be a non-empty list of non-empty strings"
    for key in wanted & {"phrase", "left", "right", "word", "text"}:
        if not isinstance(check[key], str) or not check[key]:
            return f"check {kind!r}: {key} must be a non-empty string"
    return None


def run_check(check: dict, response: str) -> bool:
    """One check on one answer; an empty answer follows no instruction (it would pass `excludes`,
    `no_digits` or `simplified_only` for free)."""
    if not response.strip():
        return False
    return CHECKS[check["type"]](response, **{k: v for k, v in check.items() if k != "type"})


def check_item(item: dict, response: str) -> list[bool]:
    """Strict: each check of the item on the response as generated."""
    return [run_check(c, response) for c in item["checks"]]


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: the response, without its first line, without its last, without
    both, and each of those with markdown emphasis (`*`) removed."""
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return base + [v.replace("*", "") for v in base]


def check_item_loose(item: dict, response: str) -> list[bool]:
    """Loose: a check passes when it passes on any non-empty loose variant of the response."""
    variants = [v for v in loose_variants(response) if v.strip()] or [response]
    return [any(run_check(c, v) for v in variants) for c in item["checks"]]


def metrics(item: dict, response: str) -> dict[str, float]:
    """IFEval's four metrics of one answer; inst-level values are the item's share of passing checks."""
    strict, loose = check_item(item, response), check_item_loose(item, response)
    return {
        "prompt_level_strict_acc": float(all(strict)),
        "inst_level_strict_acc": sum(strict) / len(strict),
        "prompt_level_loose_acc": float(all(loose)),
        "inst_level_loose_acc": sum(loose) / len(loose),
    }


# ------------------------------------------------------------------ language fidelity


def zh_fidelity(response: str) -> float:
    """1.0 when an answer is written in simplified Chinese as asked: no traditional-only
    characters and no slip into a Latin-script language (Latin letters no more than the CJK
    characters; a name or unit such as "CPU" or "km" among Chinese is fine). An answer with
    neither, such as a bare number, counts as faithful."""
    cjk = sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in response)
    latin = len(_LATIN.findall(response))
    return float(latin <= cjk and not traditional_chars(response))
