"""Tests of search/checkpoints.py on tiny random Llama models built here (no network)."""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from search.checkpoints import (
    Checkpoint,
    TensorInfo,
    assert_aligned,
    check_alignment,
    model_layer_count,
    open_checkpoint,
    resolve_model_path,
)
from search.errors import AlignmentError, CheckpointError, MergeSearchError

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]  # 64 = vocab_size
UP = "model.layers.0.mlp.up_proj.weight"


def tiny_tokenizer(words=WORDS, bos="<s>", extra=()):
    """A word-level fast tokenizer with bos/eos/pad/unk; `extra` become additional special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"additional_special_tokens": list(extra)} if extra else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs
    )


def save_tiny_llama(folder: Path, seed: int, max_shard_size: str | None = None) -> dict[str, torch.Tensor]:
    """Save a random 2-layer Llama (hidden 16, vocab 64) and tiny_tokenizer() to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """Two aligned sources: a/inst-v1 (single file) and b/inst-v2 (sharded), with their state dicts."""
    root = tmp_path_factory.mktemp("family")
    v1, v2 = root / "a" / "inst-v1", root / "b" / "inst-v2"
    return {"v1": v1, "v2": v2, "sd1": save_tiny_llama(v1, seed=0), "sd2": save_tiny_llama(v2, 1, "2KB")}


def variant(tmp_path: Path, src: Path, tensors=None, config=None, tokenizer="keep") -> Path:
    """A copy of the single-file source `src` at tmp_path/c/inst-v3, edited: `tensors(sd)` and
    `config(cfg)` mutate in place; `tokenizer` is "keep", None (remove) or a tokenizer to save."""
    dst = tmp_path / "c" / "inst-v3"
    shutil.copytree(src, dst)
    if tensors:
        sd = load_file(dst / "model.safetensors")
        tensors(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tokenizer != "keep":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (dst / name).unlink(missing_ok=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(dst)
    return dst


def problems_between(a: Path, b: Path) -> list[str]:
    with open_checkpoint("a", a) as ca, open_checkpoint("b", b) as cb:
        return check_alignment([ca, cb])


# --- opening and reading -------------------------------------------------------------------------

def test_single_file_reads_back_the_state_dict(family):
    with open_checkpoint("inst-v1", family["v1"]) as ck:
        assert isinstance(ck, Checkpoint) and ck.name == "inst-v1" and ck.path == family["v1"]
        assert ck.config["model_type"] == "llama" and ck.config["hidden_size"] == 16
        assert set(ck.tensors) == set(family["sd1"])
        info = ck.tensors[UP]
        assert (info.file, info.dtype, info.shape) == (family["v1"] / "model.safetensors", torch.float32, (32, 16))
        assert info.start > 8
        for name, expected in family["sd1"].items():
            torch.testing.assert_close(ck.read(name), expected, rtol=0, atol=0)


def test_read_into_reads_straight_from_the_file_or_converts(family, tmp_path):
    with open_checkpoint("inst-v1", family["v1"]) as ck:
        for name, expected in family["sd1"].items():
            dest = torch.empty(expected.numel(), dtype=torch.float32)
            ck.read_into(name, dest)  # same dtype: the direct path
            assert torch.equal(dest, expected.reshape(-1))
            half = torch.empty(expected.numel(), dtype=torch.bfloat16)
            ck.read_into(name, half)  # converted through read()
            assert torch.equal(half, expected.reshape(-1).to(torch.bfloat16))
    # a file cut short after its header was read: the tensor named, not a torch error
    cut = tmp_path / "cut"
    shutil.copytree(family["v1"], cut)
    with open_checkpoint("cut", cut) as ck:
        f = cut / "model.safetensors"
        last = max(ck.tensors, key=lambda n: ck.tensors[n].start)
        f.write_bytes(f.read_bytes()[:-8])
        with pytest.raises(CheckpointError, match=f"tensor {last} is truncated"):
            ck.read_into(last, torch.empty(math.prod(ck.tensors[last].shape)))


def test_sharded_reads_back_the_state_dict_in_shard_order(family):
    with open_checkpoint("inst-v2", family["v2"]) as ck:
        files = [info.file for info in ck.tensors.values()]
        assert len(set(files)) > 2 and all(f.parent == family["v2"] for f in files)
        shard_numbers = [int(f.name.split("-")[1]) for f in files]  # model-0000K-of-0000N.safetensors
        assert shard_numbers == sorted(shard_numbers)
        assert set(ck.tensors) == set(family["sd2"])
        for name, expected in family["sd2"].items():
            torch.testing.assert_close(ck.read(name), expected, rtol=0, atol=0)


def test_handles_are_cached_closed_and_reopened(family):
    ck = open_checkpoint("inst-v1", family["v1"])
    with ck:
        ck.read(UP)
        ck.read("lm_head.weight")
        assert len(ck._handles) == 1  # one file, one handle
    assert ck._handles == {}
    torch.testing.assert_close(ck.read(UP), family["sd1"][UP], rtol=0, atol=0)
    ck.close()


def test_read_tensors_are_owned_by_the_caller(family):
    # safetensors hands out views of one shared memory map; an in-place edit must not leak.
    with open_checkpoint("inst-v1", family["v1"]) as ck:
        ck.read(UP).add_(1.0)
        torch.testing.assert_close(ck.read(UP), family["sd1"][UP], rtol=0, atol=0)


def test_reading_an_unknown_tensor_names_it(family):
    with open_checkpoint("inst-v1", family["v1"]) as ck, pytest.raises(CheckpointError, match="no.such"):
        ck.read("no.such.weight")


def test_unknown_dtype_does_not_crash_open_or_alignment(family, tmp_path):
    # A hand-written header with a dtype code that neither torch nor this safetensors knows.
    dst = variant(tmp_path, family["v1"])
    sd = load_file(dst / "model.safetensors")
    header, data, offset = {}, b"", 0
    for name, t in sd.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    header[UP]["dtype"] = "Q4X"
    blob = json.dumps(header).encode()
    (dst / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    with open_checkpoint("odd", dst) as ck:
        assert ck.tensors[UP].dtype == "Q4X" and ck.tensors[UP].shape == (32, 16)
        assert ck.tensors["lm_head.weight"].dtype == torch.float32
        with pytest.raises(CheckpointError, match="model.safetensors"):
            ck.read(UP)
    assert problems_between(family["v1"], dst) == [
        f"tensor {UP}: dtype torch.float32 in {family['v1']} but Q4X in {dst}"]


# --- alignment -----------------------------------------------------------------------------------

def test_aligned_sources_report_nothing(family):
    assert problems_between(family["v1"], family["v2"]) == []
    with open_checkpoint("a", family["v1"]) as a, open_checkpoint("b", family["v2"]) as b:
        assert_aligned([a, b])
        assert check_alignment([a]) == []


def _reshape_up(sd):
    sd[UP] = torch.zeros(32, 8)


def _set(field, value):
    return lambda cfg: cfg.__setitem__(field, value)


CASES = {
    "shape": (dict(tensors=_reshape_up), "tensor {UP}: shape (32, 16) in {A} but (32, 8) in {B}"),
    "missing tensor": (dict(tensors=lambda sd: sd.pop("lm_head.weight")),
                       "tensor lm_head.weight: missing in {B} (present in {A})"),
    "extra tensor": (dict(tensors=lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2))),
                     "tensor model.extra.weight: missing in {A} (present in {B})"),
    "dtype": (dict(tensors=lambda sd: sd.__setitem__(UP, sd[UP].bfloat16())),
              "tensor {UP}: dtype torch.float32 in {A} but torch.bfloat16 in {B}"),
    "config field": (dict(config=_set("num_key_value_heads", 2)),
                     "config num_key_value_heads: 1 in {A} but 2 in {B}"),
    "config field absent": (dict(config=lambda cfg: cfg.pop("tie_word_embeddings")),
                            "config tie_word_embeddings: False in {A} but missing in {B}"),
    "tokenizer vocab": (dict(tokenizer=tiny_tokenizer(WORDS[:-1] + ["zz"])),
                        "tokenizer: vocabulary differs (1 tokens only in {A}, 1 only in {B}; e.g. 'w59', 'zz')"),
    "tokenizer ids": (dict(tokenizer=tiny_tokenizer(WORDS[:4] + WORDS[5:] + WORDS[4:5])),
                      "tokenizer: 60 tokens have different ids, e.g. 'w0' is 4 in {A} but 63 in {B}"),
    "tokenizer special": (dict(tokenizer=tiny_tokenizer(bos="w0")),
                          "tokenizer: special tokens differ: bos_token '<s>' in {A} but 'w0' in {B}"),
    "tokenizer missing": (dict(tokenizer=None), "tokenizer: missing in {B} (present in {A})"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_mismatch_names_what_and_both_folders(family, tmp_path, case):
    edits, expected = CASES[case]
    b = variant(tmp_path, family["v1"], **edits)
    assert problems_between(family["v1"], b) == [expected.format(UP=UP, A=family["v1"], B=b)]


def test_additional_special_tokens_differ(family, tmp_path):
    b = variant(tmp_path, family["v1"], tokenizer=tiny_tokenizer(WORDS[:-1] + ["<x>"], extra=["<x>"]))
    problems = problems_between(family["v1"], b)
    assert f"tokenizer: special tokens differ: additional [] in {family['v1']} but ['<x>'] in {b}" in problems
    assert any(p.startswith("tokenizer: vocabulary differs (1 tokens") for p in problems)


def test_tokenizer_larger_than_the_embedding(family, tmp_path):
    b = variant(tmp_path, family["v1"], tokenizer=tiny_tokenizer(WORDS + ["x1", "x2"]))
    problems = problems_between(family["v1"], b)
    assert f"tokenizer: ids up to 65 but the embedding has 64 rows (vocab_size) in {b}" in problems


def test_all_mismatches_are_reported_at_once(family, tmp_path):
    def edit(sd):
        _reshape_up(sd)
        sd.pop("lm_head.weight")
        sd["model.norm.weight"] = sd["model.norm.weight"].half()

    bad = variant(tmp_path, family["v1"], tensors=edit, config=_set("model_type", "mistral"),
                  tokenizer=tiny_tokenizer(bos="w0"))
    a, ok = family["v1"], family["v2"]
    expected = [
        f"config model_type: 'llama' in {a} but 'mistral' in {bad}",
        f"tokenizer: special tokens differ: bos_token '<s>' in {a} but 'w0' in {bad}",
        f"tensor lm_head.weight: missing in {bad} (present in {a})",
        f"tensor {UP}: shape (32, 16) in {a} but (32, 8) in {bad}",
        f"tensor model.norm.weight: dtype torch.float32 in {a} but torch.float16 in {bad}",
    ]
    with open_checkpoint("a", a) as ca, open_checkpoint("ok", ok) as cok, open_checkpoint("bad", bad) as cbad:
        assert sorted(check_alignment([ca, cok, cbad])) == sorted(expected)
        with pytest.raises(AlignmentError) as err:
            assert_aligned([ca, cok, cbad])
    lines = str(err.value).splitlines()
    assert lines[0] == "3 sources are not aligned: 5 problems"
    assert sorted(lines[1:]) == sorted(expected)
    assert isinstance(err.value, MergeSearchError)


# --- refusals --------------------------------------------------------------------------------------

def test_pickle_only_folder_is_refused(family, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(family["v1"] / "config.json", folder)
    torch.save(family["sd1"], folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint("p", folder)
    msg = str(err.value)
    assert str(folder) in msg and "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg


def test_missing_config_names_the_file(family, tmp_path):
    b = variant(tmp_path, family["v1"])
    (b / "config.json").unlink()
    with pytest.raises(CheckpointError, match=str(b / "config.json")):
        open_checkpoint("b", b)


def test_empty_and_weightless_folders(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: empty folder"):
        open_checkpoint("e", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint("e", tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        open_checkpoint("e", tmp_path / "nope")


def test_missing_shard_is_named(family, tmp_path):
    b = tmp_path / "sharded"
    shutil.copytree(family["v2"], b)
    (b / "model-00003-of-00012.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        open_checkpoint("b", b)
    assert str(b / "model.safetensors.index.json") in str(err.value)
    assert "model-00003-of-00012.safetensors" in str(err.value)


def test_shard_not_holding_what_the_index_says(family, tmp_path):
    b = tmp_path / "sharded"
    shutil.copytree(family["v2"], b)
    index = json.loads((b / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00012.safetensors"  # it lives elsewhere
    (b / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint("b", b)
    assert str(b / "model-00001-of-00012.safetensors") in str(err.value) and "lm_head.weight" in str(err.value)


CORRUPTIONS = {
    "truncated": lambda raw: raw[:5],
    "huge header length": lambda raw: struct.pack("<Q", 10**12) + raw[8:],
    "not json": lambda raw: raw[:8] + b"{not json" + raw[17:],
    "data cut short": lambda raw: raw[:-100],
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_header_names_the_file(family, tmp_path, corruption):
    b = variant(tmp_path, family["v1"])
    file = b / "model.safetensors"
    file.write_bytes(CORRUPTIONS[corruption](file.read_bytes()))
    with pytest.raises(CheckpointError, match=f"{file}: corrupt safetensors header"):
        open_checkpoint("b", b)


def test_model_layer_count():
    assert model_layer_count({"num_hidden_layers": 32}) == 32
    assert model_layer_count({"model_type": "llava", "text_config": {"num_hidden_layers": 4}}) == 4
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        model_layer_count({"hidden_size": 16})
    with pytest.raises(CheckpointError, match="positive integer but got '2'"):
        model_layer_count({"num_hidden_layers": "2"})


# --- resolving paths and hub ids ---------------------------------------------------------------------

def test_relative_path_resolves_against_base_dir(family):
    assert resolve_model_path("inst-v1", base_dir=family["v1"].parent) == family["v1"].resolve()
    assert resolve_model_path(str(family["v1"])) == family["v1"].resolve()


def test_home_is_expanded(family, monkeypatch):
    monkeypatch.setenv("HOME", str(family["v1"].parent))
    assert resolve_model_path("~/inst-v1", base_dir=Path("/elsewhere")) == family["v1"].resolve()


def fake_hub_snapshot(cache: Path, repo_id: str) -> Path:
    """Lay out what huggingface_hub leaves in its cache after a download of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_in_the_local_cache_resolves(tmp_path, monkeypatch, env):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(env, str(tmp_path))
    cache = tmp_path if env == "HF_HUB_CACHE" else tmp_path / "hub"
    snapshot = fake_hub_snapshot(cache, "hfl/llama-3-chinese-8b-instruct-v2")
    monkeypatch.chdir(tmp_path)  # so the id is not also a relative folder by accident
    assert resolve_model_path("hfl/llama-3-chinese-8b-instruct-v2") == snapshot


def test_unknown_hub_id_is_an_error_naming_it_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    fake_hub_snapshot(tmp_path, "hfl/other")
    for missing in ("hfl/not-downloaded", "not/a/path", "nothing-here"):
        with pytest.raises(CheckpointError) as err:
            resolve_model_path(missing)
        assert str(err.value) == (f"{missing}: not a local folder and not in the local Hugging Face cache "
                                  f"({tmp_path})")
