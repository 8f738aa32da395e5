"""examples/attention_map.py: the drawn maps are softmax(Q K^T / sqrt(d_k)) computed from
transformers' own query/key layers on its own hidden states; the PNG is written; the [CLS] summary."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "attention_map.py"


def run(*args):
    """The script as a user runs it: ``(exit status, stdout, stderr)``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return p.returncode, p.stdout, p.stderr


TEXT = "the cat sat on the mat because it was tired"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir):
    d = tmp_path_factory.mktemp("tiny_bert")
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    m = transformers.BertModel(cfg)
    with torch.no_grad():  # sharper, less uniform maps than the N(0, 0.02) init
        for layer in m.encoder.layer:
            layer.attention.self.query.weight.mul_(40)
            layer.attention.self.key.weight.mul_(40)
    m.save_pretrained(d)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / f, d / f)
    return d, m.eval()


def reference_probs(model, input_ids) -> torch.Tensor:
    """[layers, heads, T, T] = softmax(Q K^T / sqrt(d_k)) with HF's query/key Linear layers on HF's hidden states."""
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, output_attentions=True)
        n_heads = model.config.num_attention_heads
        dk = model.config.hidden_size // n_heads
        maps = []
        for layer, x in zip(model.encoder.layer, out.hidden_states[:-1]):
            q = layer.attention.self.query(x)[0].view(-1, n_heads, dk).transpose(0, 1)
            k = layer.attention.self.key(x)[0].view(-1, n_heads, dk).transpose(0, 1)
            maps.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dk), -1))
    return torch.stack(maps), torch.stack([a[0] for a in out.attentions])


def test_maps_are_the_reference_softmax_and_the_png_is_written(tiny, tmp_path):
    from fnlm.data import load_tokenizer
    from fnlm.models import attention_maps, cls_summary, load_bert

    d, model = tiny
    params, cfg = load_bert(d, pooler=False, strict=False)
    tok = load_tokenizer(d)
    tokens, probs = attention_maps(params, cfg, tok, TEXT)
    ids = tok.encode([TEXT])["input_ids"]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and len(tokens) == ids.shape[1]
    ref, hf_attn = reference_probs(model, ids)
    assert probs.shape == ref.shape == (2, 4, len(tokens), len(tokens))
    assert (probs - ref).abs().max() <= 1e-5
    assert (probs - hf_attn).abs().max() <= 1e-5
    assert ref.max() > 0.5  # the maps are not near-uniform, so the comparison means something

    summary = cls_summary(tokens, probs)
    want = ref[-1, :, 0, :].mean(0)
    assert [j for j, _, _ in summary][0] == int(want.argmax())
    assert all(abs(w - float(want[j])) <= 1e-5 for j, _, w in summary)
    assert abs(sum(w for _, _, w in summary) - 1.0) <= 1e-5

    png = tmp_path / "maps" / "att.png"
    rc, out, err = run(TEXT, "--weights", d, "--out", png, "--top", 3)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 100 and img.shape[1] >= 2 * img.shape[0]  # 2 layers x 4 heads: twice as wide as tall
    assert "where [CLS] attends in the last layer" in out and len(out.splitlines()) == 3 + 3
    rc, _, err = run(TEXT, "--weights", d, "--out", tmp_path / "last.png", "--layers=-1")
    assert rc == 0 and (tmp_path / "last.png").is_file(), err


def test_bad_input_is_one_line(tiny, tmp_path):
    d, _ = tiny
    for args in (
        ("--weights", d, "--out", tmp_path / "a.png", "--layers=7"),
        ("--weights", tmp_path, "--out", tmp_path / "a.png"),
        ("--weights", d, "--out", tmp_path / "a.jpg"),
    ):
        rc, _, err = run(TEXT, *args)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "a.png").exists()
