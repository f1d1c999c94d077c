"""The demo model family: a tiny char-level Chinese Llama base and three instruct variants.

    python -m search.demo        # build (or find in the cache) and print the folders

Everything is synthetic and deterministic: one generator writes the pretraining text, each
variant's instruction data and the demo eval suite, and the codes of the eval split never
appear in any training text. Skills are digit-by-digit renderings of 4-digit codes, rules a
4-layer model learns in seconds and applies to held-out codes:

    numerals  (inst-v1)    4705 -> 四七零五
    daxie     (inst-v2)    4705 -> 肆柒零伍
    arabic    (inst-meta)  四七零五 -> 4705

The base learns Chinese sentences and then to echo a code in chat form (the copy circuit every
skill needs); each variant is fine-tuned from it on one skill. As the variants share the
"where to look" and differ in "what to write", a linear merge keeps all three skills and beats
every single variant on the mixed suite.

The variants differ in strength, so that the merge weights matter: inst-v1 and inst-v2 are
long fine-tunes (160 steps at lr 2e-3), inst-meta a light one (30 steps at 3e-4) that masters
its skill alone but loses it when diluted. The uniform average keeps numerals and daxie and
drops arabic to about 0.7; the best weights give inst-meta most of the mass (suite scores,
80 items per task and split, on the 0.05 grid of the weight simplex):

    inst-v1 / inst-v2 / inst-meta alone    0.52 / 0.47 / 0.51 dev    0.50 / 0.45 / 0.56 test
    uniform (1/3 each)                     0.91 dev                  0.88 test
    grid optimum (0.15, 0.15, 0.70)        1.00 dev                  0.98 test (the same point)

The build trains in a child process on pinned kernels (PINNED_KERNELS), so every x86-64
machine gets the same bits and these figures (tests/test_demo.py holds the fingerprints).
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import random
import shutil
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from search.errors import MergeSearchError

logger = logging.getLogger(__name__)

DEMO_VERSION = 3  # 3: trained in a child process on pinned kernels (the same bits on every x86-64 CPU)
MODEL_NAMES = ("inst-v1", "inst-v2", "inst-meta")

BOS, EOS, PAD, UNK = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>", "<|unk|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, HEADER_START, HEADER_END)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# ------------------------------------------------------------------ skills and the demo suite

_ZH_DIGITS = "零一二三四五六七八九"
_DAXIE_DIGITS = "零壹贰叁肆伍陆柒捌玖"
CODE_LEN = 4


def to_zh(code: str) -> str:
    """Digits read one by one in Chinese, as for a phone number: "4705" -> "四七零五"."""
    return "".join(_ZH_DIGITS[int(c)] for c in code)


def to_daxie(code: str) -> str:
    """Digits in the financial (大写) form: "4705" -> "肆柒零伍"."""
    return "".join(_DAXIE_DIGITS[int(c)] for c in code)


@dataclass(frozen=True)
class Skill:
    """One instruction skill: a task of the demo suite and the variant that learns it."""

    task: str
    model: str
    description: str
    templates: tuple[str, ...]  # questions, each ending in "：{x}" so the answer lines up with x
    source: Callable[[str], str]  # code -> x, the code as written in the question
    target: Callable[[str], str]  # code -> the answer


SKILLS = (
    Skill("numerals", "inst-v1", "把号码写成中文数字 (4705 -> 四七零五)",
          ("把这个号码写成中文数字：{x}", "请用汉字写出这串数字：{x}", "这个号码用中文怎么读：{x}"),
          str, to_zh),
    Skill("daxie", "inst-v2", "把号码写成大写数字 (4705 -> 肆柒零伍)",
          ("把这个号码写成大写数字：{x}", "请写出这串数字的大写：{x}", "这个号码的大写是什么：{x}"),
          str, to_daxie),
    Skill("arabic", "inst-meta", "把中文数字写成阿拉伯数字 (四七零五 -> 4705)",
          ("把这个号码写成阿拉伯数字：{x}", "请用阿拉伯数字写出：{x}", "这串汉字是什么号码：{x}"),
          to_zh, str),
)
N_EVAL = 80  # items per task and split
_SEED = 20240607


def code_split() -> dict[str, list[str]]:
    """Disjoint sets of 4-digit codes: "train" (all training text) and f"{task}.{split}".

    Each task gets its own dev and test codes; no held-out code of any task appears in any
    training text (pretraining corpus included).
    """
    rng = random.Random(_SEED)
    pool = [f"{i:0{CODE_LEN}d}" for i in range(10 ** CODE_LEN)]
    rng.shuffle(pool)
    out, i = {}, 0
    for skill in SKILLS:
        for split in ("dev", "test"):
            out[f"{skill.task}.{split}"] = sorted(pool[i:i + N_EVAL])
            i += N_EVAL
    out["train"] = sorted(pool[i:])
    return out


def train_examples(task: str) -> list[tuple[str, str]]:
    """(question, answer) pairs a variant is fine-tuned on: each train code with one template."""
    skill = _skill(task)
    rng = random.Random(f"{_SEED}-{task}-train")
    return [(rng.choice(skill.templates).format(x=skill.source(c)), skill.target(c))
            for c in code_split()["train"]]


def _distractors(code: str, rng: random.Random) -> list[str]:
    """Three wrong codes that look like `code`: one digit changed, or two neighbours swapped."""
    out: list[str] = []
    while len(out) < 3:
        d = list(code)
        pos = rng.randrange(CODE_LEN)
        if rng.random() < 0.3 and pos < CODE_LEN - 1 and d[pos] != d[pos + 1]:
            d[pos], d[pos + 1] = d[pos + 1], d[pos]
        else:
            d[pos] = str((int(d[pos]) + rng.choice((1, 2, 3, 7, 8, 9))) % 10)
        wrong = "".join(d)
        if wrong != code and wrong not in out:
            out.append(wrong)
    return out


def eval_items(task: str, split: str) -> list[dict]:
    """The demo suite's `choice` items of one task: id, question, 4 choices, answer index."""
    skill = _skill(task)
    rng = random.Random(f"{_SEED}-{task}-{split}")
    items = []
    for k, code in enumerate(code_split()[f"{task}.{split}"], start=1):
        codes = [code] + _distractors(code, rng)
        rng.shuffle(codes)
        question = rng.choice(skill.templates).format(x=skill.source(code))
        items.append({"id": f"{task}-{split}-{k:04d}", "question": question,
                      "choices": [skill.target(c) for c in codes], "answer": codes.index(code)})
    return items


def _skill(task: str) -> Skill:
    for skill in SKILLS:
        if skill.task == task:
            return skill
    raise ValueError(f"Unknown demo task {task!r}. Available: {', '.join(s.task for s in SKILLS)}")


def write_suite(out_dir: Path) -> None:
    """Write the demo eval suite (suite.yaml + one dev and one test JSONL per task) to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    q = lambda s: json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML scalar
    about = "Held-out items of the demo family's three skills; a good merge beats every source."
    lines = ["name: demo", f"description: {q(about)}", "tasks:"]
    for skill in SKILLS:
        files = {}
        for split in ("dev", "test"):
            files[split] = f"{skill.task}.{split}.jsonl"
            body = "".join(json.dumps(item, ensure_ascii=False) + "\n"
                           for item in eval_items(skill.task, split))
            (out_dir / files[split]).write_text(body, encoding="utf-8")
        lines += [f"  - name: {skill.task}", "    kind: choice",
                  f"    description: {q(skill.description)}",
                  f"    data: {{dev: {files['dev']}, test: {files['test']}}}", "    weight: 1.0"]
    (out_dir / "suite.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- training text

_WORDS = {
    "p": ("小明", "小红", "小王", "老师", "妈妈", "爸爸", "奶奶", "同学们", "医生", "我们", "他", "她"),
    "pl": ("学校", "公园", "商店", "图书馆", "家里", "北京", "上海", "山上", "河边", "医院"),
    "t": ("今天", "昨天", "明天", "早上", "晚上", "周末", "春天", "冬天"),
    "a": ("看书", "写字", "唱歌", "跑步", "吃饭", "买菜", "画画", "上课", "散步", "喝茶"),
    "adj": ("很好", "很大", "很高兴", "很冷", "很热", "很美", "很安静"),
}
_SENTENCES = ("{t}{p}在{pl}{a}。", "{p}觉得{pl}{adj}。", "{p}说：“{t}我想去{pl}{a}。”",
              "{p}的电话号码是{code}，{p}在{pl}。", "{p}住在{zh}号房间，{t}很安静。",
              "这张发票的号码是{daxie}。")  # each mentions a code in one form only: no mapping leaks


def _sentence(rng: random.Random, code: str) -> str:
    words = {k: rng.choice(v) for k, v in _WORDS.items()}
    return rng.choice(_SENTENCES).format(code=code, zh=to_zh(code), daxie=to_daxie(code), **words)


def render_chat(question: str, answer: str | None = None) -> str:
    """The chat template's text for one user turn, then the answer (or the assistant prompt)."""
    text = f"{BOS}{HEADER_START}user{HEADER_END}\n\n{question.strip()}{EOS}"
    text += f"{HEADER_START}assistant{HEADER_END}\n\n"
    return text if answer is None else text + answer.strip() + EOS


_ECHO_TEMPLATES = ("请重复这个号码：{x}", "把这串字照抄一遍：{x}", "请原样写出：{x}")


def _echo(rng: random.Random, code: str) -> str:
    """A chat exchange that repeats a code in one of its three forms (never maps between forms)."""
    x = rng.choice((str, to_zh, to_daxie))(code)
    return render_chat(rng.choice(_ECHO_TEMPLATES).format(x=x), x)


def echo_examples() -> list[tuple[str, str]]:
    """(question, answer) pairs that repeat a train code in one of its three forms."""
    rng = random.Random(f"{_SEED}-echo")
    return [(rng.choice(_ECHO_TEMPLATES).format(x=f(c)), f(c))
            for c in code_split()["train"] for f in (str, to_zh, to_daxie)]


def pretrain_text(n_docs: int = 6000, echo_share: float = 0.3) -> str:
    """The base model's pretraining corpus: sentences and a share of chat exchanges that echo.

    The echoes give the base the chat format and a copy circuit; each variant then only has to
    learn its own per-character mapping on top, which is what keeps their linear merges working.
    """
    rng = random.Random(f"{_SEED}-pretrain")
    train = code_split()["train"]
    return "".join((_echo if rng.random() < echo_share else _sentence)(rng, rng.choice(train))
                   for _ in range(n_docs))


# ------------------------------------------------------------------------------ tokenizer

# frequent characters beyond the generators', so everyday Chinese text mostly avoids <|unk|>
_COMMON_CHARS = ("的一是不了人我在有这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过"
                 "家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手用主行方又如前所本")


def _charset() -> list[str]:
    """Every character the generators can write, plus ASCII and common CJK punctuation."""
    chars = set(string.ascii_letters + string.digits + string.punctuation + " \n")
    chars |= set("，。？！：；、“”‘’（）《》…—" + _COMMON_CHARS + "十百千万拾佰仟")
    chars |= set(pretrain_text()) | set(_ZH_DIGITS + _DAXIE_DIGITS)
    chars |= set("".join(t for skill in SKILLS for t in skill.templates))
    return sorted(chars)


def build_tokenizer():
    """A char-level PreTrainedTokenizerFast with Llama-3 style special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _charset():
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, vocab[BOS])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=[HEADER_START, HEADER_END], model_max_length=256)
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ------------------------------------------------------------------------------ training

@dataclass(frozen=True)
class Recipe:
    """Model shape and training schedule of the demo family (a change needs a new DEMO_VERSION)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 320
    max_positions: int = 256
    base_steps: int = 100  # pretraining on the synthetic corpus
    base_lr: float = 3e-3
    base_batch: int = 24
    base_seq: int = 64
    echo_share: float = 0.3  # share of pretraining documents that are echo chat exchanges
    echo_steps: int = 200  # then answer-only training on echo exchanges: the shared copy circuit
    echo_lr: float = 2e-3  # (it forms after ~110 steps; before it does, merges wash out)
    # fine-tuning of each variant from the base, in MODEL_NAMES order: unequal strengths put the
    # best merge off the centre of the simplex (a light inst-meta needs most of the weight)
    ft_steps: tuple[int, ...] = (160, 160, 30)
    ft_lr: tuple[float, ...] = (2e-3, 2e-3, 3e-4)
    ft_batch: int = 32
    threads: int = 1  # pinned, as float summation order depends on it; 1 because with 2 threads
    # on 2 busy cores, OpenMP barriers made training steps 20-30x slower (measured)
    seed: int = _SEED

    def __post_init__(self):
        for name in ("ft_steps", "ft_lr"):
            if len(getattr(self, name)) != len(MODEL_NAMES):
                raise ValueError(f"Recipe.{name} needs one value per variant ({', '.join(MODEL_NAMES)}) "
                                 f"but got {getattr(self, name)}")


def _model_config(tok, r: Recipe):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=r.hidden, intermediate_size=r.intermediate,
        num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.heads,
        max_position_embeddings=r.max_positions, tie_word_embeddings=False, dtype="float32",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _schedule(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 10% of steps, then linear decay to zero."""
    warm = max(1, steps // 10)
    return lr * min((step + 1) / warm, (steps - step) / (steps - warm + 1))


def _train(name: str, model, batches, steps: int, lr: float) -> None:
    """AdamW over `batches()` -> (input_ids, labels), labels -100 ignored; logs the last loss."""
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _schedule(step, steps, lr)
        ids, labels = batches()
        logits = model(input_ids=ids).logits[:, :-1]  # right padding: no mask needed (causal)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    logger.info("%s: loss %.3f after %d steps (%.1fs)", name, loss.item(), steps,
                time.perf_counter() - t0)


def _pretrain_batches(tok, r: Recipe, gen: torch.Generator):
    text = pretrain_text(echo_share=r.echo_share)
    ids = torch.tensor(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    bos = torch.full((r.base_batch, 1), tok.bos_token_id)

    def batch():
        starts = torch.randint(0, len(ids) - r.base_seq, (r.base_batch,), generator=gen)
        x = torch.cat([bos, torch.stack([ids[s:s + r.base_seq] for s in starts.tolist()])], 1)
        return x, x

    return batch


def encode_chat(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of each rendered user/assistant exchange and the index where its answer starts.

    Renders with `render_chat` (the chat template's exact text; a test holds them equal) and
    encodes in one batch: the jinja template per example would cost seconds of the build.
    """
    enc = tok.backend_tokenizer.encode_batch
    prompts = enc([render_chat(q) for q, _ in pairs], add_special_tokens=False)
    wholes = enc([render_chat(q, a) for q, a in pairs], add_special_tokens=False)
    return [(w.ids, len(p.ids)) for p, w in zip(prompts, wholes)]


def _chat_batches(tok, pairs: list[tuple[str, str]], r: Recipe, gen: torch.Generator):
    examples = encode_chat(tok, pairs)

    def batch():
        picks = torch.randint(0, len(examples), (r.ft_batch,), generator=gen).tolist()
        width = max(len(examples[i][0]) for i in picks)
        ids = torch.full((r.ft_batch, width), tok.pad_token_id)
        labels = torch.full((r.ft_batch, width), -100)
        for row, i in enumerate(picks):
            seq, start = examples[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, start:len(seq)] = torch.tensor(seq[start:])  # loss on the answer + EOS
        return ids, labels

    return batch


# Training runs in a child process whose kernels are pinned: torch's own CPU kernels to their
# baseline build (no AVX2/AVX-512 variants) and MKL to its COMPATIBLE branch, the one code path
# MKL keeps on every x86-64 CPU, Intel's or AMD's. Left to pick by CPU, float summation orders
# differed and the family trained apart: uniform scored 0.86 dev on one machine and 0.93 on
# another. Both are read when the libraries load, hence the fresh process. Pinned, the build
# costs ~2.5x the time (about 4 minutes on 2 cores); other architectures (aarch64) get a
# family of the same recipe, not the same bits.
PINNED_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
}


def build_family(out: Path, recipe: Recipe = Recipe()) -> dict[str, Path]:
    """Train the base and the three variants and save them as HF folders under `out`.

    Deterministic across x86-64 machines: seeded, one thread, and trained in a child process
    with PINNED_KERNELS set (this process's kernels are left as they are).
    """
    import dataclasses
    import subprocess
    import sys

    threads = str(recipe.threads)  # summation order depends on the thread count too
    env = {**os.environ, **PINNED_KERNELS, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    root = str(Path(__file__).resolve().parents[1])  # the child imports this same `search`
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    level = logging.INFO if logger.isEnabledFor(logging.INFO) else logging.WARNING
    cmd = [sys.executable, "-m", "search.demo", "--train-into", str(out),
           json.dumps(dataclasses.asdict(recipe)), str(level)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.stderr:
        sys.stderr.write(proc.stderr)  # the child's progress lines
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise MergeSearchError(f"Building the demo family into {out} failed (exit {proc.returncode}): "
                               f"{last[0]}")
    return _family_paths(out)


def _train_into(out: Path, recipe: Recipe) -> None:
    """The child's side of build_family: train with the pinned kernels and save."""
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        raise RuntimeError(f"ATEN_CPU_CAPABILITY=default was not honoured (torch {torch.__version__} "
                           f"runs {torch.backends.cpu.get_cpu_capability()} kernels)")
    torch.set_num_threads(recipe.threads)
    models, tok = _train_family(recipe)
    for name, model in models.items():
        _save(model, tok, out / name)


def _train_family(r: Recipe):
    from transformers import LlamaForCausalLM

    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    tok = build_tokenizer()
    base = LlamaForCausalLM(_model_config(tok, r))
    _train("base (pretraining)", base, _pretrain_batches(tok, r, gen), r.base_steps, r.base_lr)
    echo = _chat_batches(tok, echo_examples(), r, gen)
    _train("base (echo)", base, echo, r.echo_steps, r.echo_lr)
    models = {"base": base}
    for skill in SKILLS:  # every variant starts from the same base: one basin, mergeable
        i = MODEL_NAMES.index(skill.model)
        models[skill.model] = copy.deepcopy(base)
        _train(f"{skill.model} ({skill.task})", models[skill.model],
               _chat_batches(tok, train_examples(skill.task), r, gen), r.ft_steps[i], r.ft_lr[i])
    return models, tok


def _save(model, tok, folder: Path) -> Path:
    """save_pretrained the model (safetensors, with a greedy generation config) and tokenizer."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=16)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per tiny file is noise
    try:
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return folder


# --------------------------------------------------------------------------------- cache

def cache_root() -> Path:
    """$MERGE_SEARCH_CACHE if set, else ~/.cache/merge-search."""
    env = os.environ.get("MERGE_SEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "merge-search"


def demo_family_dir(root: Path | None = None) -> Path:
    """The cache folder of this DEMO_VERSION: (root or cache_root()) / demo-family-v{N}."""
    return Path(root if root is not None else cache_root()) / f"demo-family-v{DEMO_VERSION}"


def _family_paths(folder: Path) -> dict[str, Path]:
    paths = {name: folder / name for name in ("base",) + MODEL_NAMES}
    missing = [str(p / f) for p in paths.values() for f in ("model.safetensors", "tokenizer.json")
               if not (p / f).is_file()]
    if missing:
        raise MergeSearchError(f"Demo family folder {folder} is incomplete (missing "
                               f"{', '.join(missing)}); delete it to rebuild.")
    return paths


def ensure_demo_family(root: Path | None = None) -> dict[str, Path]:
    """Folders of the demo family {"base", *MODEL_NAMES} -> Path; builds them when missing.

    The build goes to a temporary folder beside the target and is renamed into place at the
    end, so the cache never holds a half-built family; a lock file makes a second process
    wait for the first build instead of starting its own.
    """
    target = demo_family_dir(root)
    if target.is_dir():
        return _family_paths(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on a crash
        if not target.is_dir():
            for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            logger.info("Building the demo family into %s (about 4 minutes on 2 CPU cores)", target)
            t0 = time.perf_counter()
            try:
                build_family(tmp)
                os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache may be shared
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            logger.info("Demo family built in %.0fs", time.perf_counter() - t0)
    return _family_paths(target)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--train-into"]:  # build_family's child: DIR RECIPE_JSON LOG_LEVEL
        logging.basicConfig(level=int(sys.argv[4]), format="%(message)s")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[3]).items()}
        _train_into(Path(sys.argv[2]), Recipe(**fields))
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, path in ensure_demo_family().items():
        print(f"{name}\t{path}")
