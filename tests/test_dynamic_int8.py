"""Dynamic int8 (fnlm.nn.dynamic_int8_matmul, the pure forward on quantize_int8's tree, the exported
package): against an explicit int64 reference of the formula, transformers' float32 logits, and
torch.ao's quantize_dynamic on the same transformers model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnlm.data import WordPieceTokenizer
from fnlm.models import bert_classifier, export_classifier, export_classifier_program, load_bert
from fnlm.nn import dynamic_int8_matmul, int8_linear, linear, quantize_int8, quantize_weight

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]
#: The stated tolerance: dynamic int8 logits differ from float32's by at most this fraction of
#: the largest float32 logit magnitude (plus 0.02 absolute), on these random-weight models.
REL_TOL, ABS_TOL = 0.03, 0.02


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The formula spelled out in float64 / int64: per-row activation scales, per-column weight scales."""
    w_q = torch.round(w.double() / (w.double().abs().amax(0) / 127)).clamp(-127, 127).long()
    s = w.double().abs().amax(0) / 127
    x2 = x.double().reshape(-1, x.shape[-1])
    a = x2.abs().amax(-1, keepdim=True) / 127
    x_q = torch.round(x2 / a).clamp(-127, 127).long()
    return ((x_q @ w_q).double() * a * s).reshape(*x.shape[:-1], w.shape[-1])


def test_matmul_equals_the_explicit_formula():
    g = torch.Generator().manual_seed(0)
    for shape, (k, n) in (((5, 24), (24, 7)), ((2, 3, 64), (64, 48)), ((1, 16), (16, 1))):
        x, w = torch.randn(*shape, generator=g) * 3, torch.randn(k, n, generator=g)
        w_q, s = quantize_weight(w)
        got = dynamic_int8_matmul(x, w_q, s, backend="int_mm")
        assert got.shape == (*shape[:-1], n) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference(x, w), rtol=1e-6, atol=1e-6)
        # and close to the float product it approximates
        assert (got - x @ w).abs().max() <= 0.02 * (x @ w).abs().max()
    b = torch.randn(7, generator=g)
    w_q, s = quantize_weight(w := torch.randn(24, 7, generator=g))
    x = torch.randn(4, 24, generator=g)
    torch.testing.assert_close(
        int8_linear({"weight_int8": w_q, "weight_scale": s, "bias": b}, x, backend="int_mm").double(),
        reference(x, w) + b.double(),
        rtol=1e-6,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="features"):
        int8_linear({"weight_int8": w_q, "weight_scale": s}, torch.randn(4, 23))
    with pytest.raises(ValueError, match="backend"):
        dynamic_int8_matmul(x, w_q, s, backend="cuda")


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm")
def test_fbgemm_backend_equals_torch_ao_dynamic_linear_on_the_same_int8_weights():
    """backend='fbgemm' (what 'auto' picks in eager CPU inference) is torch.ao's dynamic Linear."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(48, 20, generator=g), torch.randn(20, generator=g)
    x = torch.randn(3, 7, 48, generator=g) * 2
    w_q, s = quantize_weight(w)
    ref = torch.ao.nn.quantized.dynamic.Linear(48, 20, dtype=torch.qint8)
    qw = torch.quantize_per_channel(
        w_q.t().float() * s[:, None], s.double(), torch.zeros(20, dtype=torch.long), 0, torch.qint8
    )
    assert torch.equal(qw.int_repr(), w_q.t())
    ref.set_weight_bias(qw, b)
    with torch.no_grad():
        want = ref(x)
        got = linear({"weight_int8": w_q, "weight_scale": s, "bias": b}, x)  # 'auto' -> fbgemm here
        assert torch.equal(got, int8_linear({"weight_int8": w_q, "weight_scale": s, "bias": b}, x, backend="fbgemm"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - (x @ w + b)).abs().max() <= 0.05 * (x @ w).abs().max()
    # with autograd the same call takes the traceable int_mm formula
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(
        linear({"weight_int8": w_q, "weight_scale": s, "bias": b}, xg).detach().double(),
        reference(x, w) + b.double(),
        rtol=1e-6,
        atol=1e-6,
    )


def hf_classifier(seed=0):
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    m = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        m.classifier.weight.mul_(20)  # logits of O(1)
    return m.eval()


def batch(seed=0, B=6, L=48):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (B, L), generator=g)
    mask = (torch.arange(L)[None] < torch.randint(8, L + 1, (B, 1), generator=g)).long()
    return ids * mask, mask


def test_logits_within_the_stated_tolerance_of_float32_and_of_torch_ao(tmp_path):
    ref = hf_classifier()
    ref.save_pretrained(tmp_path)
    params, cfg = load_bert(tmp_path, head="classifier")
    ids, mask = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        ao = torch.ao.quantization.quantize_dynamic(ref, {torch.nn.Linear}, dtype=torch.qint8)
        ao_logits = ao(input_ids=ids, attention_mask=mask).logits
    q = quantize_int8(params)
    bound = REL_TOL * want.abs().max() + ABS_TOL
    with torch.no_grad():
        got = bert_classifier(q, ids, cfg, attention_mask=mask)  # eager: fbgemm where available
    from fnlm.nn import _dynamic_int8

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():  # the traceable formula (what export runs)
        mp.setattr(_dynamic_int8, "_fbgemm_ok", lambda x: False)
        got_int_mm = bert_classifier(q, ids, cfg, attention_mask=mask)
    assert not torch.equal(got, got_int_mm)
    for name, z in (("auto", got), ("int_mm", got_int_mm)):
        err = (z - want).abs().max()
        print(
            f"{name}: max |int8 - fp32| = {err:.4f}, torch.ao quantize_dynamic: {(ao_logits - want).abs().max():.4f}, "
            f"max |fp32| = {want.abs().max():.3f}"
        )
        assert err <= bound, (name, err, bound)
        assert (z.argmax(-1) == want.argmax(-1)).float().mean() >= 5 / 6
        assert err > 0  # the int8 path really ran (it is not the float forward)


FRESH = """
import json, sys, torch
from fnlm.models import load_classifier_package
clf = load_classifier_package(sys.argv[1], trust_package=True)  # our own package, just written
ids, mask = torch.tensor(json.loads(sys.argv[2])), torch.tensor(json.loads(sys.argv[3]))
print(json.dumps({"logits": clf.logits(ids, mask).tolist(), "meta": clf.meta}))
"""


def test_exported_dynamic_int8_program_equals_the_pure_forward_in_a_fresh_process(tmp_path, monkeypatch):
    words = "a great film awful boring".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = WordPieceTokenizer.from_vocab(vocab)
    ref = hf_classifier(seed=3)
    ref.save_pretrained(tmp_path / "m")
    params, cfg = load_bert(tmp_path / "m", head="classifier")
    program = export_classifier_program(params, cfg, max_len=48, int8="dynamic")
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("_int_mm" in o for o in ops), ops  # int8 x int8 products inside the exported graph
    path = export_classifier(params, cfg, tok, tmp_path / "pkg", max_len=48, int8="dynamic", form="program")
    ids, mask = batch(seed=1, B=3, L=20)
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(path), json.dumps(ids.tolist()), json.dumps(mask.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["meta"]["int8"] is True and out["meta"]["int8_mode"] == "dynamic"
    from fnlm.nn import _dynamic_int8

    monkeypatch.setattr(_dynamic_int8, "_fbgemm_ok", lambda x: False)  # eager through the exported kernel
    with torch.no_grad():
        want = bert_classifier(quantize_int8(params), ids, cfg, attention_mask=mask)
    torch.testing.assert_close(torch.tensor(out["logits"]), want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="int8"):
        export_classifier_program(params, cfg, max_len=48, int8="int4")
