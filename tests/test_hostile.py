"""Hostile and careless inputs (issue 21): each case builds its input in milliseconds and
asserts the one-line error or the safe outcome, and that nothing ran, was written outside its
directory, or was lost. Memory cases run in a subprocess under ``RLIMIT_AS`` = 2 GB."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fnlm
import fnlm.config
import fnlm.io
import fnlm.train
from fnlm.data import WordPieceTokenizer
from fnlm.models import (
    BertConfig,
    TamperedPackageError,
    UntrustedPackageError,
    export_classifier,
    init_bert_classifier,
    load_classifier_package,
    package_status,
)

WORDS = "a great film awful boring the plot was".split()
CFG = BertConfig(
    vocab_size=5 + len(WORDS),
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    id2label=("neg", "pos"),
)


def one_line(e: BaseException | str) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert msg and "\n" not in msg.strip(), msg
    return msg


# ============================================================================ 1. consent before code
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return WordPieceTokenizer.from_vocab(vocab)


@pytest.fixture(scope="module")
def program_package(tokenizer, tmp_path_factory):
    params = init_bert_classifier(fnlm.random.key(0), CFG)
    return export_classifier(
        params, CFG, tokenizer, tmp_path_factory.mktemp("pkg") / "export", max_len=16, form="program"
    )


def copy_package(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class WriteMarker:
    """Unpickling this writes ``path`` (what a malicious pickle would do, harmlessly)."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return Path.write_text, (self.path, "pwned")


def malicious_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": WriteMarker(marker)}, buf)
    return buf.getvalue()


def rewrite_zip(file: Path, replace: dict[str, bytes]) -> None:
    """Rewrite the zip ``file`` with the members whose names end in a key of ``replace`` replaced."""
    src = zipfile.ZipFile(io.BytesIO(file.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            z.writestr(info.filename, data)
    file.write_bytes(out.getvalue())


def reseal(pkg: Path) -> None:
    """Recompute export.json's checksums, as an attacker who controls the whole folder can."""
    import hashlib

    meta = json.loads((pkg / "export.json").read_text())
    meta["files"] = {n: hashlib.sha256((pkg / n).read_bytes()).hexdigest() for n in meta["files"]}
    (pkg / "export.json").write_text(json.dumps(meta))


def plant_pickle(pkg: Path, marker: Path, where: str) -> None:
    """A marker-writing pickle inside program.pt2: as the sample inputs (torch falls back to
    weights_only=False on them), or as a weight flagged ``use_pickle`` (loaded unrestricted)."""
    prog = pkg / "program.pt2"
    if where == "sample_inputs":
        rewrite_zip(prog, {"data/sample_inputs/model.pt": malicious_pickle(marker)})
    else:
        z = zipfile.ZipFile(io.BytesIO(prog.read_bytes()))
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        cfg = json.loads(z.read(name))
        fqn, meta = next(iter(cfg["config"].items()))
        meta["use_pickle"] = True
        rewrite_zip(
            prog, {name: json.dumps(cfg).encode(), "data/weights/" + meta["path_name"]: malicious_pickle(marker)}
        )


def test_package_checksums_written_and_trusted_load_works(program_package, tokenizer):
    import hashlib

    meta = json.loads((program_package / "export.json").read_text())
    files = sorted(p.name for p in program_package.iterdir() if p.name != "export.json")
    assert sorted(meta["files"]) == files and "program.pt2" in files
    for name, digest in meta["files"].items():
        assert hashlib.sha256((program_package / name).read_bytes()).hexdigest() == digest
    assert package_status(program_package, trust_package=True) is None
    clf = load_classifier_package(program_package, trust_package=True)
    assert clf.predict_proba(["a great film"]).shape == (1, 2)


def test_package_untrusted_is_refused_and_status_says_why(program_package):
    with pytest.raises(UntrustedPackageError) as e:
        load_classifier_package(program_package)
    assert "trust_package=True" in one_line(e)
    status = package_status(program_package, trust_package=False)
    assert "not trusted" in one_line(status)


@pytest.mark.parametrize("where", ["sample_inputs", "use_pickle_weight"])
def test_planted_pickle_really_runs_in_torch_export_load(program_package, tmp_path, where):
    """The threat is real: torch.export.load itself unpickles the planted object (reference)."""
    pkg = copy_package(program_package, tmp_path / "pkg")
    marker = tmp_path / "MARKER"
    plant_pickle(pkg, marker, where)
    try:
        torch.export.load(str(pkg / "program.pt2"))
    except Exception:
        pass
    assert marker.exists()


@pytest.mark.parametrize("where", ["sample_inputs", "use_pickle_weight"])
def test_planted_pickle_never_unpickled(program_package, tmp_path, where):
    pkg = copy_package(program_package, tmp_path / "pkg")
    marker = tmp_path / "MARKER"
    plant_pickle(pkg, marker, where)
    with pytest.raises(UntrustedPackageError):  # no consent
        load_classifier_package(pkg)
    with pytest.raises(TamperedPackageError) as e:  # consent, but the file changed after export
        load_classifier_package(pkg, trust_package=True)
    assert "sha256" in one_line(e)
    reseal(pkg)  # consent and matching checksums: still never unpickled
    with pytest.raises(TamperedPackageError) as e:
        load_classifier_package(pkg, trust_package=True)
    assert "pickle" in one_line(e)
    assert "pickle" in package_status(pkg, trust_package=True)
    assert not marker.exists()


def marker_library(tmp_path: Path, marker: Path) -> bytes:
    """A shared library whose constructor writes ``marker`` (gcc), else fake bytes."""
    src = tmp_path / "evil.c"
    src.write_text(
        textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void evil(void) {{
            FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("pwned", f); fclose(f); }}
        }}""")
    )
    so = tmp_path / "evil.so"
    if shutil.which("gcc") and subprocess.run(["gcc", "-shared", "-fPIC", "-o", so, src]).returncode == 0:
        return so.read_bytes()
    return b"\x7fELF fake shared library"


def aoti_package(program_package: Path, tmp_path: Path, marker: Path) -> Path:
    """An 'aoti' package whose model.pt2 holds the marker-writing library, sealed with checksums."""
    pkg = copy_package(program_package, tmp_path / "aoti")
    (pkg / "program.pt2").unlink()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model/archive_format", "pt2")
        z.writestr("model/data/aotinductor/model/model.so", marker_library(tmp_path, marker))
    (pkg / "model.pt2").write_bytes(buf.getvalue())
    meta = json.loads((pkg / "export.json").read_text())
    meta.update(form="aoti", file="model.pt2")
    meta["files"]["model.pt2"] = meta["files"].pop("program.pt2")
    (pkg / "export.json").write_text(json.dumps(meta))
    reseal(pkg)
    return pkg


def test_marker_library_is_real(tmp_path):
    """Reference: dlopen-ing the library writes the marker (when gcc built it)."""
    import ctypes

    marker = tmp_path / "MARKER"
    lib = marker_library(tmp_path, marker)
    if not lib.startswith(b"\x7fELF\x02") and not lib.startswith(b"\x7fELF\x01"):
        pytest.skip("no C compiler: the fake library cannot run anyway")
    ctypes.CDLL(str(tmp_path / "evil.so"))
    assert marker.exists()


def test_native_library_not_loaded_without_consent_or_when_tampered(program_package, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    pkg = aoti_package(program_package, tmp_path, marker)
    loads = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: loads.append(a))
    with pytest.raises(UntrustedPackageError) as e:
        load_classifier_package(pkg)
    assert "model.pt2" in one_line(e)
    assert "not trusted" in package_status(pkg, trust_package=False)
    with (pkg / "model.pt2").open("ab") as f:
        f.write(b"\0")  # tampered after sealing
    with pytest.raises(TamperedPackageError) as e:
        load_classifier_package(pkg, trust_package=True)
    assert "model.pt2" in one_line(e) and "sha256" in str(e.value)
    assert "sha256" in package_status(pkg, trust_package=True)
    assert not loads and not marker.exists()


@pytest.mark.parametrize("change", ["extra_file", "symlink", "missing", "no_checksums"])
def test_package_file_set_must_match(program_package, tmp_path, change):
    pkg = copy_package(program_package, tmp_path / "pkg")
    if change == "extra_file":
        (pkg / "extra.so").write_bytes(b"x")
    elif change == "symlink":
        (pkg / "vocab.txt").unlink()
        (pkg / "vocab.txt").symlink_to(tmp_path / "elsewhere")
    elif change == "missing":
        (pkg / "vocab.txt").unlink()
    else:
        meta = json.loads((pkg / "export.json").read_text())
        del meta["files"]
        (pkg / "export.json").write_text(json.dumps(meta))
    with pytest.raises(TamperedPackageError) as e:
        load_classifier_package(pkg, trust_package=True)
    one_line(e)


# ============================================================================ shared small inputs
@pytest.fixture(scope="module")
def bert_dir(tokenizer, tmp_path_factory):
    """A tiny BERT classifier checkpoint (HF layout) with its tokenizer."""
    from fnlm.models import save_bert

    root = tmp_path_factory.mktemp("bert")
    tok_dir = tokenizer.save(root / "tok")
    return save_bert(init_bert_classifier(fnlm.random.key(0), CFG), CFG, root / "model", tokenizer_dir=tok_dir)


def write_safetensors_header(path: Path, header) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"\0" * 64)
    return path


def json_file(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def train_state(tmp: Path, **change) -> Path:
    d = tmp / "state"
    fnlm.train.save_train_state(d, {"w": torch.ones(2)}, (), 3, fnlm.random.key(0))
    meta = json.loads((d / "train_state.json").read_text())
    meta.update(change)
    (d / "train_state.json").write_text(json.dumps(meta) if "raw" not in change else change["raw"])
    return d


def deep_structure(depth: int) -> dict:
    node: dict = {"value": 1}
    for _ in range(depth):
        node = {"list": [node]}
    return {"dict": [["params", node], ["opt_state", {"tuple": []}], ["key", {"tensor": "key"}]]}


def tiny_gpt2_config(tmp: Path, **change) -> Path:
    from fnlm.models import GPT2Config, gpt2_config_to_hf

    d = gpt2_config_to_hf(GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    d.update(change)
    return json_file(tmp / "gpt2" / "config.json", d)


def gpt2_params():
    from fnlm.models import GPT2Config, init_gpt2

    cfg = GPT2Config(vocab_size=17, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    return init_gpt2(fnlm.random.key(0), cfg), cfg


# ============================================================================ 4. one line per bad input
def _generate(**kw):
    from fnlm.models import generate

    params, cfg = gpt2_params()
    args = dict(prompts=[[1, 2]], max_new_tokens=2, compile=False) | kw
    return generate(params, cfg, **args)


def _sample(fn, **kw):
    from fnlm.models import filter_logits, sample_logits

    f = {"sample": sample_logits, "filter": filter_logits}[fn]
    extra = {"key": fnlm.random.key(0)} if fn == "sample" else {}
    return f(torch.randn(2, 5), **extra, **kw)


def _encode(texts, **kw):
    return lambda tok, tmp, bert: tok.encode_ids(texts, **kw)


CASES = {
    # ---- safetensors headers
    "safetensors_header_is_a_list": (
        lambda tok, tmp, bert: fnlm.io.read_safetensors(write_safetensors_header(tmp / "m.safetensors", [1, 2])),
        "m.safetensors: not a safetensors file \\(header is a JSON list",
    ),
    "safetensors_tensor_without_data_offsets": (
        lambda tok, tmp, bert: fnlm.io.read_safetensors(
            write_safetensors_header(tmp / "m.safetensors", {"w": {"dtype": "F32", "shape": [2]}})
        ),
        "m.safetensors: .*'w' has no valid data_offsets",
    ),
    "safetensors_offsets_not_ints": (
        lambda tok, tmp, bert: fnlm.io.read_safetensors(
            write_safetensors_header(
                tmp / "m.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}
            )
        ),
        "m.safetensors: .*data_offsets",
    ),
    # ---- tokenizer files
    "tokenizer_json_corrupt": (
        lambda tok, tmp, bert: fnlm.data.load_tokenizer(json_file(tmp / "t" / "tokenizer.json", "{not json").parent),
        "tokenizer.json: not a tokenizers file",
    ),
    "tokenizer_json_wrong_schema": (
        lambda tok, tmp, bert: fnlm.data.load_tokenizer(json_file(tmp / "t" / "tokenizer.json", {"model": 3}).parent),
        "tokenizer.json: not a tokenizers file",
    ),
    "tokenizer_config_corrupt": (
        lambda tok, tmp, bert: fnlm.data.load_tokenizer(json_file(tmp / "t" / "tokenizer_config.json", "[1,").parent),
        "tokenizer_config.json: not valid JSON",
    ),
    "tokenizer_config_not_object": (
        lambda tok, tmp, bert: fnlm.data.load_tokenizer(json_file(tmp / "t" / "tokenizer_config.json", [1]).parent),
        "tokenizer_config.json: not a JSON object",
    ),
    "vocab_not_utf8": (
        lambda tok, tmp, bert: (
            tmp.joinpath("vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\n"),
            fnlm.data.WordPieceTokenizer.from_vocab(tmp / "vocab.txt"),
        ),
        "vocab.txt is not UTF-8",
    ),
    # ---- undecodable text
    "lone_surrogate_in_texts": (_encode(["fine", "bad \ud800 text"]), "texts\\[1\\]: not valid Unicode"),
    "undecodable_argv_text": (_encode([os.fsdecode(b"caf\xe9")]), "texts\\[0\\]: not valid Unicode"),
    "lone_surrogate_in_pairs": (_encode(["a"], pairs=["\udcff"]), "pairs\\[0\\]: not valid Unicode"),
    "lone_surrogate_in_config_argv": (
        lambda tok, tmp, bert: fnlm.config.parse_config(_TextConfig, ["--text", os.fsdecode(b"\xff")]),
        "(--text is not valid Unicode|argument .* is not valid UTF-8)",
    ),
    # ---- adapter configs
    "adapter_config_without_r": (
        lambda tok, tmp, bert: fnlm.models.read_lora_config(
            json_file(tmp / "a" / "adapter_config.json", {"peft_type": "LORA", "lora_alpha": 8}).parent
        ),
        "adapter_config.json: 'r' must be a positive integer \\(the rank\\), got nothing",
    ),
    "adapter_config_r_is_text": (
        lambda tok, tmp, bert: fnlm.models.read_lora_config(
            json_file(tmp / "a" / "adapter_config.json", {"peft_type": "LORA", "r": "8", "lora_alpha": 8}).parent
        ),
        "adapter_config.json: 'r' must be",
    ),
    "adapter_config_without_alpha": (
        lambda tok, tmp, bert: fnlm.models.read_lora_config(
            json_file(tmp / "a" / "adapter_config.json", {"peft_type": "LORA", "r": 4}).parent
        ),
        "adapter_config.json: 'lora_alpha' must be a positive number",
    ),
    "adapter_config_is_a_list": (
        lambda tok, tmp, bert: fnlm.models.read_lora_config(json_file(tmp / "a" / "adapter_config.json", []).parent),
        "adapter_config.json: not a JSON object",
    ),
    # ---- train_state.json
    "train_state_step_is_text": (
        lambda tok, tmp, bert: fnlm.train.validate_train_state(train_state(tmp, step="3")),
        "train_state.json: 'step' must be an integer",
    ),
    "train_state_structure_is_a_list": (
        lambda tok, tmp, bert: fnlm.train.validate_train_state(train_state(tmp, structure=[1])),
        "train_state.json: 'structure' must describe a dict",
    ),
    "train_state_without_params": (
        lambda tok, tmp, bert: fnlm.train.validate_train_state(
            train_state(tmp, structure={"dict": [["key", {"tensor": "key"}]]})
        ),
        "train_state.json: 'structure' lacks \\['opt_state', 'params'\\]",
    ),
    "train_state_nested_100000_deep": (
        lambda tok, tmp, bert: fnlm.train.validate_train_state(train_state(tmp, raw="[" * 100_000 + "]" * 100_000)),
        "train_state.json: (JSON nested too deeply|not an fnlm.train_state file)",
    ),
    "train_state_nested_300_deep": (
        lambda tok, tmp, bert: fnlm.train.validate_train_state(train_state(tmp, structure=deep_structure(300))),
        "train_state.json: .*nested more than 256 levels",
    ),
    "train_state_bad_entry": (
        lambda tok, tmp, bert: fnlm.train.validate_train_state(
            train_state(
                tmp,
                structure={"dict": [["params", {"dict": 5}], ["opt_state", {"tuple": []}], ["key", {"tensor": "k"}]]},
            )
        ),
        "train_state.json: structure.params: must be a list of \\[name, entry\\] pairs",
    ),
    "train_state_not_json": (
        lambda tok, tmp, bert: fnlm.train.validate_train_state(train_state(tmp, raw="{")),
        "train_state.json: not valid JSON",
    ),
    # ---- generate / sampling arguments
    "generate_float_prompt_ids": (
        lambda tok, tmp, bert: _generate(prompts=[[1.0, 2.5]]),
        "prompts\\[0\\] must be integer token ids, got 1.0",
    ),
    "generate_float_prompt_tensor": (
        lambda tok, tmp, bert: _generate(prompts=torch.tensor([[1.0, 2.0]])),
        "prompts must be integer token ids, got a torch.float32 tensor",
    ),
    "generate_bool_prompt_ids": (
        lambda tok, tmp, bert: _generate(prompts=[[True, 2]]),
        "prompts\\[0\\] must be integer token ids, got True",
    ),
    "generate_top_k_true": (
        lambda tok, tmp, bert: _generate(top_k=True, temperature=1.0, key=fnlm.random.key(0)),
        "top_k must be a positive integer or None, got True",
    ),
    "generate_top_k_float": (
        lambda tok, tmp, bert: _generate(top_k=2.0, temperature=1.0, key=fnlm.random.key(0)),
        "top_k must be a positive integer",
    ),
    "generate_max_new_tokens_float": (
        lambda tok, tmp, bert: _generate(max_new_tokens=2.0),
        "max_new_tokens must be a positive integer, got 2.0",
    ),
    "generate_max_new_tokens_bool": (
        lambda tok, tmp, bert: _generate(max_new_tokens=True),
        "max_new_tokens must be a positive integer, got True",
    ),
    "generate_float_stop_tokens": (
        lambda tok, tmp, bert: _generate(stop_tokens=[1.5]),
        "stop_tokens must be integer token ids",
    ),
    "generate_temperature_text": (
        lambda tok, tmp, bert: _generate(temperature="1"),
        "temperature must be a finite number >= 0",
    ),
    "sample_top_p_zero": (lambda tok, tmp, bert: _sample("sample", top_p=0.0), "top_p must be in \\(0, 1\\]"),
    "sample_top_p_above_one": (lambda tok, tmp, bert: _sample("sample", top_p=1.5), "top_p must be in \\(0, 1\\]"),
    "sample_top_p_nan": (lambda tok, tmp, bert: _sample("sample", top_p=float("nan")), "top_p must be in"),
    "sample_temperature_negative": (
        lambda tok, tmp, bert: _sample("sample", temperature=-1.0),
        "temperature must be a finite number >= 0",
    ),
    "sample_temperature_nan": (
        lambda tok, tmp, bert: _sample("sample", temperature=float("nan")),
        "temperature must be a finite number >= 0",
    ),
    "sample_top_k_zero": (lambda tok, tmp, bert: _sample("sample", top_k=0), "top_k must be a positive integer"),
    "filter_temperature_zero": (
        lambda tok, tmp, bert: _sample("filter", temperature=0.0),
        "temperature must be a finite number > 0",
    ),
    "filter_temperature_inf": (
        lambda tok, tmp, bert: _sample("filter", temperature=float("inf")),
        "temperature must be a finite number > 0",
    ),
    "filter_top_p_negative": (lambda tok, tmp, bert: _sample("filter", top_p=-0.1), "top_p must be in"),
    # ---- configs
    "gpt2_layer_norm_epsilon_negative": (
        lambda tok, tmp, bert: fnlm.models.read_gpt2_config(tiny_gpt2_config(tmp, layer_norm_epsilon=-1)),
        "config.json: GPT2Config.layer_norm_epsilon must be a finite number > 0, got -1",
    ),
    "gpt2_layer_norm_epsilon_nan": (
        lambda tok, tmp, bert: fnlm.models.read_gpt2_config(tiny_gpt2_config(tmp, layer_norm_epsilon=float("nan"))),
        "config.json: GPT2Config.layer_norm_epsilon must be a finite number > 0, got nan",
    ),
    "gpt2_layer_norm_epsilon_text": (
        lambda tok, tmp, bert: fnlm.models.read_gpt2_config(tiny_gpt2_config(tmp, layer_norm_epsilon="1e-5")),
        "config.json: GPT2Config.layer_norm_epsilon must be a finite number > 0",
    ),
    "bert_layer_norm_eps_inf": (
        lambda tok, tmp, bert: fnlm.models.read_bert_config(
            json_file(tmp / "config.json", {"model_type": "bert", "layer_norm_eps": float("inf")})
        ),
        "config.json: BertConfig.layer_norm_eps must be a finite number > 0",
    ),
    "bert_num_hidden_layers_1e9": (
        lambda tok, tmp, bert: fnlm.models.read_bert_config(
            json_file(tmp / "config.json", {"model_type": "bert", "num_hidden_layers": 10**9})
        ),
        "config.json: BertConfig.num_hidden_layers must be a positive integer <= 4,096",
    ),
    "gpt2_n_layer_1e9": (
        lambda tok, tmp, bert: fnlm.models.read_gpt2_config(tiny_gpt2_config(tmp, n_layer=10**9)),
        "config.json: GPT2Config.n_layer must be a positive integer <= 4,096",
    ),
    "bert_vocab_2e9": (
        lambda tok, tmp, bert: fnlm.models.read_bert_config(
            json_file(tmp / "config.json", {"model_type": "bert", "vocab_size": 2 * 10**9})
        ),
        "config.json: BertConfig.vocab_size must be a positive integer <= ",
    ),
    # ---- encode bounds
    "encode_max_len_1e9": (
        lambda tok, tmp, bert: tok.encode(["a"], max_len=10**9, padding="max_length"),
        "max_len=1,000,000,000 is beyond the model's 512 positions",
    ),
    "encode_ids_max_len_1e9": (_encode(["a"], max_len=10**9), "max_len=1,000,000,000 is beyond any model's positions"),
    "encode_long_text_error": (
        _encode(["a" * 1_000_001], long_text="error"),
        "texts\\[0\\]: 1,000,001 characters, over MAX_TEXT_CHARS=1,000,000",
    ),
}


@dataclasses.dataclass
class _TextConfig:
    text: str = fnlm.config.option("", "a text")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, tokenizer, tmp_path, bert_dir):
    make, pattern = CASES[case]
    with pytest.raises((ValueError, OSError, TypeError)) as e:
        make(tokenizer, tmp_path, bert_dir)
    assert re.search(pattern, one_line(e)), str(e.value)
    assert not isinstance(e.value, (KeyError, IndexError, RecursionError))


# ============================================================================ 3. bounded memory (RLIMIT_AS = 2 GB)
class _Repeat(io.RawIOBase):
    """``n`` bytes of ``b'a'``, produced as read (a 200 MB review costs no memory to archive)."""

    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left)
        b[:k] = b"a" * k
        self.left -= k
        return k


def imdb_archive(path: Path, long_bytes: int) -> Path:
    """An aclImdb tar.gz: one review of ``long_bytes`` bytes without a space, one short per class."""
    import tarfile

    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for name, n in (
            ("aclImdb/train/pos/0_9.txt", long_bytes),
            ("aclImdb/train/neg/1_2.txt", 5),
            ("aclImdb/test/pos/2_9.txt", 5),
            ("aclImdb/test/neg/3_1.txt", 5),
        ):
            info = tarfile.TarInfo(name)
            info.size = n
            tf.addfile(info, io.BufferedReader(_Repeat(n), 1 << 20))
    return path


MEMORY_SCRIPT = r"""
import json, resource, sys, traceback, warnings
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
import torch, fnlm
from fnlm.data import MAX_TEXT_CHARS, load_imdb, load_tokenizer
from fnlm.models import load_bert, load_gpt2
archive, bert_huge, bert_layers, gpt2_layers, tok_dir = sys.argv[1:6]
tok = load_tokenizer(tok_dir)

def review_200mb_truncated():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train = load_imdb(archive, "train")
    [text] = [t for t in train.texts if len(t) > 5]
    ids = tok.encode_ids(train.texts, max_len=512, truncation="head+tail")
    return {"chars": len(text), "warning": str(w[0].message), "ids": len(ids[1])}

cases = {
    "review_200mb_truncated": review_200mb_truncated,
    "review_200mb_refused": lambda: load_imdb(archive, "train", long_text="error"),
    "bert_config_1e9_layers": lambda: load_bert(bert_layers, head="classifier"),
    "gpt2_config_1e9_layers": lambda: load_gpt2(gpt2_layers),
    "bert_config_beyond_memory": lambda: load_bert(bert_huge, head="mlm", head_key=fnlm.random.key(0), pooler=False),
    "encode_max_len_1e9": lambda: tok.encode(["a"], max_len=10**9, padding="max_length"),
}
out = {}
for name, fn in cases.items():
    try:
        out[name] = {"ok": fn()}
    except Exception as e:
        out[name] = {"error": type(e).__name__, "message": str(e)}
# VmHWM: this process's own peak resident memory. (ru_maxrss is not: across exec it keeps the parent's
# peak, and a long pytest process forks this one.)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
out["maxrss_mb"] = hwm_kb / 1024
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def memory_results(bert_dir, tmp_path_factory):
    from fnlm.models import save_gpt2

    tmp = tmp_path_factory.mktemp("memory")
    archive = imdb_archive(tmp / "aclImdb_v1.tar.gz", 200 * 10**6)
    dirs = {}
    for name, change in (
        ("huge", {"hidden_size": 60000, "num_attention_heads": 4}),
        ("layers", {"num_hidden_layers": 10**9}),
    ):
        d = tmp / name
        shutil.copytree(bert_dir, d)
        hf = json.loads((d / "config.json").read_text()) | change
        (d / "config.json").write_text(json.dumps(hf))
        dirs[name] = d
    params, cfg = gpt2_params()
    g = save_gpt2(params, cfg, tmp / "gpt2")
    (g / "config.json").write_text(json.dumps(json.loads((g / "config.json").read_text()) | {"n_layer": 10**9}))
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, archive, dirs["huge"], dirs["layers"], g, bert_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert archive.stat().st_size < 1_000_000  # the 200 MB review compresses to a small archive
    return json.loads(proc.stdout.strip().splitlines()[-1])


MEMORY_CASES = {
    "review_200mb_refused": ("DatasetError", "0_9.txt \\(200,000,000 bytes\\): .* over MAX_TEXT_CHARS=1,000,000"),
    "bert_config_1e9_layers": (
        "ValueError",
        "config.json: BertConfig.num_hidden_layers must be a positive integer <= 4,096",
    ),
    "gpt2_config_1e9_layers": ("ValueError", "config.json: GPT2Config.n_layer must be a positive integer <= 4,096"),
    "bert_config_beyond_memory": (
        "ConfigMemoryError",
        "config.json: the config implies .* parameters, .* GB in memory, more than this machine's .* GB",
    ),
    "encode_max_len_1e9": ("ValueError", "max_len=1,000,000,000 is beyond the model's 512 positions"),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_memory_case_is_one_line_under_2gb(memory_results, case):
    kind, pattern = MEMORY_CASES[case]
    got = memory_results[case]
    assert got.get("error") == kind, got
    assert re.search(pattern, one_line(got["message"])), got["message"]


def test_200mb_one_word_review_is_truncated_under_2gb(memory_results):
    got = memory_results["review_200mb_truncated"]["ok"]
    assert got["chars"] == fnlm.data.MAX_TEXT_CHARS
    assert "truncated to MAX_TEXT_CHARS=1,000,000" in one_line(got["warning"])
    assert got["ids"] == 3  # [CLS] [UNK] [SEP]: one word longer than WordPiece's 100 characters
    assert memory_results["maxrss_mb"] < 2048


# ============================================================================ safe outcomes
def test_save_bert_refuses_tokenizer_symlink_leaving_its_folder(tokenizer, tmp_path):
    from fnlm.models import save_bert

    secret = tmp_path / "secret.txt"
    secret.write_text("API_KEY=hunter2")
    tok_dir = tokenizer.save(tmp_path / "tok")
    (tok_dir / "added_tokens.json").symlink_to(secret)
    out = tmp_path / "run" / "model"
    with pytest.raises(ValueError) as e:
        save_bert(init_bert_classifier(fnlm.random.key(0), CFG), CFG, out, tokenizer_dir=tok_dir)
    assert "added_tokens.json is a symlink leading outside it" in one_line(e)
    assert not out.exists()
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and b"hunter2" in p.read_bytes()]


def test_save_bert_copies_symlink_inside_tokenizer_folder_as_regular_file(tokenizer, tmp_path):
    from fnlm.models import save_bert

    tok_dir = tokenizer.save(tmp_path / "tok")
    (tok_dir / "real_vocab.txt").write_bytes((tok_dir / "vocab.txt").read_bytes())
    (tok_dir / "vocab.txt").unlink()
    (tok_dir / "vocab.txt").symlink_to("real_vocab.txt")
    out = save_bert(init_bert_classifier(fnlm.random.key(0), CFG), CFG, tmp_path / "m", tokenizer_dir=tok_dir)
    assert (
        not (out / "vocab.txt").is_symlink()
        and (out / "vocab.txt").read_bytes() == (tok_dir / "real_vocab.txt").read_bytes()
    )


@pytest.mark.parametrize("what", ["file", "folder"])
def test_imdb_folder_does_not_follow_symlinks_outside(tmp_path, what):
    root = tmp_path / "data" / "aclImdb"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "9_9.txt").write_text("a secret outside the dataset")
    for split in ("train", "test"):
        for c in ("pos", "neg"):
            (root / split / c).mkdir(parents=True)
            (root / split / c / "1_8.txt").write_text("fine")
    if what == "file":
        (root / "train" / "pos" / "9_9.txt").symlink_to(outside / "9_9.txt")
    else:
        shutil.rmtree(root / "train" / "pos")
        (root / "train" / "pos").symlink_to(outside, target_is_directory=True)
    with pytest.raises(fnlm.data.DatasetError) as e:
        fnlm.data.load_imdb(tmp_path / "data", "train")
    assert "symlink leading outside the dataset folder" in one_line(e)


def test_imdb_long_review_truncated_with_warning(tmp_path):
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for c in ("pos", "neg"):
            (root / split / c).mkdir(parents=True)
            (root / split / c / "1_8.txt").write_text("fine")
    (root / "train" / "pos" / "2_9.txt").write_text("é" * (fnlm.data.MAX_TEXT_CHARS + 5))  # 2 bytes a character
    with pytest.warns(UserWarning, match="truncated to MAX_TEXT_CHARS=1,000,000"):
        train = fnlm.data.load_imdb(tmp_path, "train")
    assert sorted(map(len, train.texts)) == [4, 4, fnlm.data.MAX_TEXT_CHARS]
    with pytest.raises(fnlm.data.DatasetError, match="2_9.txt .*over MAX_TEXT_CHARS"):
        fnlm.data.load_imdb(tmp_path, "train", long_text="error")


def test_ends_only_tokenization_cuts_texts_without_spaces_exactly(tokenizer):
    """A long text without spaces but with punctuation: head+tail from its ends equals the
    tokenizers library's full tokenization of the whole text (the reference)."""
    text = "great,film." * 50_000 + "awful!boring?the-plot" * 3
    got = tokenizer.encode_ids([text], max_len=64, truncation="head+tail", head_tokens=16)[0]
    full = tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert got == [tokenizer.cls_id, *full[:16], *full[len(full) - 46 :], tokenizer.sep_id]


def test_mixed_dtype_checkpoint_is_cast_like_transformers(bert_dir, tmp_path):
    """One fp16, one bf16, one fp64 tensor: loaded as float32 (with a warning), logits as transformers'."""
    from safetensors.torch import load_file, save_file
    from transformers import BertForSequenceClassification

    from fnlm.models import bert_classifier, load_bert

    d = shutil.copytree(bert_dir, tmp_path / "mixed")
    sd = load_file(d / "model.safetensors")
    names = sorted(sd)
    for name, dt in zip([n for n in names if n.endswith("weight")][:3], (torch.float16, torch.bfloat16, torch.float64)):
        sd[name] = sd[name].to(dt)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="several dtypes .* cast to float32"):
        params, cfg = load_bert(d, head="classifier")
    assert {t.dtype for t in fnlm.tree.flatten_names(params).values()} == {torch.float32}
    ref = BertForSequenceClassification.from_pretrained(d, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(bert_classifier(params, ids, cfg), ref(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_missing_head_not_allocated_before_the_body_matches(bert_dir, tmp_path, monkeypatch):
    """config.json says hidden_size 64, the checkpoint's tensors 16: a shape error, and the
    missing MLM head is never initialised from the config's sizes."""
    import fnlm.models._bert_hf as bert_hf

    d = shutil.copytree(bert_dir, tmp_path / "m")
    hf = json.loads((d / "config.json").read_text()) | {"hidden_size": 64}
    (d / "config.json").write_text(json.dumps(hf))
    calls = []
    monkeypatch.setattr(bert_hf, "init_mlm_head", lambda *a, **k: calls.append(a))
    with pytest.raises(fnlm.io.CheckpointError, match="expected shape .* found"):
        bert_hf.load_bert(d, head="mlm", head_key=fnlm.random.key(0), pooler=False)
    assert not calls
