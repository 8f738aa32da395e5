"""fnlm.models._bert_hf: Hugging Face checkpoints -> fnlm params -> Hugging Face checkpoints.

The reference is always transformers itself: checkpoints written by ``save_pretrained`` are
loaded by fnlm and must reproduce transformers' outputs; checkpoints written by fnlm are loaded by
``from_pretrained`` with no missing / unexpected keys and must reproduce fnlm's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fnlm import random
from fnlm.io import CheckpointError, MissingHeadError, MissingPoolerError
from fnlm.models import (
    BertConfig,
    bert,
    bert_classifier,
    bert_mlm,
    init_bert,
    init_bert_classifier,
    init_bert_mlm,
    load_bert,
    save_bert,
)
from fnlm.models import _hf as hf_io
from fnlm.tree import flatten_names, tree_leaves, tree_map, tree_structure

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONFIGS = {  # (layers, heads, hidden, intermediate, act, type_vocab, eps, labels)
    "l1h2_gelu_tt2": (1, 2, 16, 32, "gelu", 2, 1e-12, 2),
    "l2h4_relu_tt1": (2, 4, 32, 48, "relu", 1, 1e-12, 3),
    "l3h1_gelu_new_tt2": (3, 1, 24, 40, "gelu_new", 2, 1e-5, 5),
}


def hf_cfg(name: str, **kw) -> "transformers.BertConfig":
    layers, heads, hidden, inter, act, tt, eps, labels = CONFIGS[name]
    return transformers.BertConfig(
        vocab_size=61,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        hidden_act=act,
        type_vocab_size=tt,
        layer_norm_eps=eps,
        max_position_embeddings=20,
        num_labels=labels,
        attn_implementation="eager",
        **kw,
    )


def make_hf(cls, config, seed=0):
    """A transformers model with every parameter (biases and LayerNorms too) randomised."""
    torch.manual_seed(seed)
    m = cls(config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def inputs(cfg, B=3, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (B, L), generator=g)
    am = (torch.arange(L)[None] < torch.tensor([L, 4, 6])[:B, None]).long()
    tt = (torch.arange(L)[None] >= 3).long() * am if cfg.type_vocab_size > 1 else torch.zeros_like(ids)
    return {"input_ids": ids * am, "attention_mask": am, "token_type_ids": tt}


def hf_loads(cls, path):
    """``from_pretrained`` that also asserts transformers found every weight and nothing else."""
    model, info = cls.from_pretrained(str(path), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """The three random configs, each saved by transformers as BertModel / classifier / MLM."""
    out = {}
    for name in CONFIGS:
        for head, cls in (
            ("none", transformers.BertModel),
            ("classifier", transformers.BertForSequenceClassification),
            ("mlm", transformers.BertForMaskedLM),
        ):
            m = make_hf(cls, hf_cfg(name), seed=len(out))
            d = tmp_path_factory.mktemp(f"{name}_{head}")
            m.save_pretrained(d)
            out[name, head] = (d, m)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints written by transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_hf_models_match(hf_saved, name):
    d, ref = hf_saved[name, "none"]
    params, cfg = load_bert(d)
    x = inputs(cfg)
    with torch.no_grad():
        out = ref(**x)
    h, pooled = bert(
        params, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
    )
    assert (h - out.last_hidden_state).abs().max() <= 1e-5
    assert (pooled - out.pooler_output).abs().max() <= 1e-5
    assert tree_structure(tree_map(lambda t: 0, params)) == tree_structure(
        tree_map(lambda t: 0, init_bert(random.key(0), cfg))
    )

    d, ref = hf_saved[name, "classifier"]
    params, cfg = load_bert(d, head="classifier")
    assert cfg.num_labels == CONFIGS[name][-1]
    with torch.no_grad():
        logits = ref(**x).logits
    assert (
        bert_classifier(
            params, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
        )
        - logits
    ).abs().max() <= 1e-5

    d, ref = hf_saved[name, "mlm"]
    params, cfg = load_bert(d, head="mlm")
    with torch.no_grad():
        logits = ref(**x).logits
    assert (
        bert_mlm(params, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"])
        - logits
    ).abs().max() <= 1e-5
    assert tree_structure(tree_map(lambda t: 0, params)) == tree_structure(
        tree_map(lambda t: 0, init_bert_mlm(random.key(0), cfg))
    )


def test_attention_layout_is_per_head(hf_saved):
    """W^Q[:, i, :] is exactly the rows of HF's query weight that produce head i."""
    d, ref = hf_saved["l2h4_relu_tt1", "none"]
    params, cfg = load_bert(d)
    q = ref.encoder.layer[1].attention.self.query.weight.detach()  # [out, in]
    o = ref.encoder.layer[1].attention.output.dense.weight.detach()  # [out, in]
    dk = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_attention_heads):
        assert torch.equal(params["encoder"]["layers"][1]["attn"]["q"]["weight"][:, i, :], q[i * dk : (i + 1) * dk].T)
        assert torch.equal(params["encoder"]["layers"][1]["attn"]["o"]["weight"][i], o[:, i * dk : (i + 1) * dk].T)


def test_sharded_checkpoint(hf_saved, tmp_path):
    d, ref = hf_saved["l2h4_relu_tt1", "classifier"]
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    a, _ = load_bert(tmp_path, head="classifier")
    b, _ = load_bert(d, head="classifier")
    assert all(torch.equal(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b)))
    # a shard that the index names but that is gone
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_bert(tmp_path, head="classifier")


def test_prefixes_legacy_names_and_ignored_keys(hf_saved, tmp_path):
    """bert./no prefix, LayerNorm gamma/beta, position_ids, an NSP head, a tied decoder weight."""
    d, _ = hf_saved["l1h2_gelu_tt2", "classifier"]
    ref_params, cfg = load_bert(d, head="classifier")
    sd = load_file(str(d / "model.safetensors"))
    legacy = {}
    for k, v in sd.items():
        k = k.removeprefix("bert.")  # body without prefix, head as is
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[k] = v
    legacy["embeddings.position_ids"] = torch.arange(20)[None]
    legacy["cls.seq_relationship.weight"] = torch.zeros(2, cfg.hidden_size)
    legacy["cls.seq_relationship.bias"] = torch.zeros(2)
    (tmp_path / "legacy").mkdir()
    save_file(legacy, str(tmp_path / "legacy" / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "legacy" / "config.json")
    params, _ = load_bert(tmp_path / "legacy", head="classifier")
    assert all(torch.equal(x, y) for x, y in zip(tree_leaves(params), tree_leaves(ref_params)))
    # the body alone out of a classifier checkpoint (a single file plus config=)
    body, _ = load_bert(tmp_path / "legacy" / "model.safetensors", config=d / "config.json")
    assert all(torch.equal(x, y) for x, y in zip(tree_leaves(body), tree_leaves(ref_params["bert"])))

    # BertForPreTraining (MLM + NSP + pooler): as MLM the pooler and NSP head are skipped
    pre = make_hf(transformers.BertForPreTraining, hf_cfg("l1h2_gelu_tt2"), seed=9)
    pre.save_pretrained(tmp_path / "pre")
    mlm, cfg = load_bert(tmp_path / "pre", head="mlm")
    assert "pooler" not in mlm["bert"]
    x = inputs(cfg)
    with torch.no_grad():
        want = pre(**x).prediction_logits
    assert (
        bert_mlm(mlm, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"])
        - want
    ).abs().max() <= 1e-5
    with_pooler, _ = load_bert(tmp_path / "pre", head="mlm", pooler=True)
    assert torch.equal(with_pooler["bert"]["pooler"]["weight"], pre.bert.pooler.dense.weight.detach().T)

    # an explicit (tied) decoder weight equal to the word embeddings is accepted, a different one is not
    sd = load_file(str(tmp_path / "pre" / "model.safetensors"))
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()
    save_file(sd, str(tmp_path / "pre" / "model.safetensors"))
    again, _ = load_bert(tmp_path / "pre", head="mlm")
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(again), tree_leaves(mlm)))
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1
    save_file(sd, str(tmp_path / "pre" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="cls.predictions.decoder.weight"):
        load_bert(tmp_path / "pre", head="mlm")


def test_missing_head_and_pooler(hf_saved):
    d, _ = hf_saved["l1h2_gelu_tt2", "none"]
    with pytest.raises(CheckpointError, match="classifier.weight") as e:
        load_bert(d, head="classifier")
    assert type(e.value) is MissingHeadError  # callers catch the type, not the message
    assert "head_key" in str(e.value) and "model.safetensors" in str(e.value)
    params, cfg = load_bert(d, head="classifier", num_labels=4, head_key=random.key(0))
    assert params["classifier"]["weight"].shape == (cfg.hidden_size, 4) and cfg.num_labels == 4
    fresh = init_bert_classifier(random.key(0), cfg)
    assert tree_structure(tree_map(lambda t: 0, params)) == tree_structure(tree_map(lambda t: 0, fresh))
    same, _ = load_bert(d, head="classifier", num_labels=4, head_key=random.key(0))
    assert torch.equal(same["classifier"]["weight"], params["classifier"]["weight"])
    with pytest.raises((ValueError, TypeError), match="key"):
        load_bert(d, head="classifier", head_key=True)
    mlm, _ = load_bert(d, head="mlm", head_key=random.key(1))
    assert torch.equal(mlm["mlm"]["bias"], torch.zeros(cfg.vocab_size))
    # an MLM checkpoint has no pooler: a bare model needs it unless pooler=False
    d, _ = hf_saved["l1h2_gelu_tt2", "mlm"]
    with pytest.raises(CheckpointError, match="pooler.dense.weight") as e:
        load_bert(d)
    assert type(e.value) is MissingPoolerError
    assert "pooler=False" in str(e.value)
    body, _ = load_bert(d, pooler=False)
    assert "pooler" not in body and bert(body, torch.tensor([[1, 2]]), cfg)[1] is None


# ---------------------------------------------------------------------------------------------
# Checkpoints written by fnlm
# ---------------------------------------------------------------------------------------------
def test_save_classifier_loads_in_transformers(tmp_path, minilm_dir):
    cfg = BertConfig(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=20,
        num_labels=3,
        id2label=("neg", "neu", "pos"),
    )
    params = init_bert_classifier(random.key(0), cfg)
    params = tree_map(lambda t: t + 0.01 * random.normal(random.key(t.numel()), t.shape), params)  # biases too
    out = save_bert(params, cfg, tmp_path / "clf", tokenizer_dir=minilm_dir)
    assert out == tmp_path / "clf"
    assert (out / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]  # nothing temporary left behind
    umask = os.umask(0o022)
    os.umask(umask)  # the directory and files get the usual permissions, not mkdtemp's private 0700
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    ref = hf_loads(transformers.BertForSequenceClassification, out)
    assert ref.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and ref.config.num_labels == 3
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    x = inputs(cfg)
    with torch.no_grad():
        want = ref(**x).logits
    got = bert_classifier(
        params, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
    )
    assert (got - want).abs().max() <= 1e-5
    # load -> save -> load is the identity, tensor by tensor
    loaded, cfg2 = load_bert(out, head="classifier")
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(loaded), tree_leaves(params)))
    save_bert(loaded, cfg2, tmp_path / "again")
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the tokenizer directory works with transformers' tokenizer
    tok = transformers.BertTokenizerFast.from_pretrained(str(out))
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_save_is_identity_on_hf_files(hf_saved, tmp_path, name):
    """HF file -> fnlm -> fnlm file: the same tensors under the same names (a bitwise round trip)."""
    for head in ("none", "classifier", "mlm"):
        d, _ = hf_saved[name, head]
        params, cfg = load_bert(d, head=head)
        save_bert(params, cfg, tmp_path / head)
        theirs = load_file(str(d / "model.safetensors"))
        ours = load_file(str(tmp_path / head / "model.safetensors"))
        theirs.pop("embeddings.position_ids", None)
        assert ours.keys() == theirs.keys(), head
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), head
        again, cfg2 = load_bert(tmp_path / head, head=head)
        assert cfg2 == cfg
        assert all(torch.equal(x, y) for x, y in zip(tree_leaves(again), tree_leaves(params)))
        assert flatten_names(again).keys() == flatten_names(params).keys()


def test_save_bare_and_mlm_load_in_transformers(tmp_path):
    cfg = BertConfig(
        vocab_size=61,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
        max_position_embeddings=20,
        type_vocab_size=1,
        hidden_act="relu",
    )
    x = inputs(cfg)
    params = init_bert(random.key(1), cfg)
    ref = hf_loads(transformers.BertModel, save_bert(params, cfg, tmp_path / "bare"))
    with torch.no_grad():
        out = ref(**x)
    h, pooled = bert(params, x["input_ids"], cfg, attention_mask=x["attention_mask"])
    assert (h - out.last_hidden_state).abs().max() <= 1e-5 and (pooled - out.pooler_output).abs().max() <= 1e-5
    with safe_open(str(tmp_path / "bare" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("bert.") for k in f.keys())

    params = init_bert_mlm(random.key(2), cfg)
    params["mlm"]["bias"] = random.normal(random.key(3), (cfg.vocab_size,))
    ref = hf_loads(transformers.BertForMaskedLM, save_bert(params, cfg, tmp_path / "mlm"))
    assert ref.cls.predictions.decoder.weight is ref.bert.embeddings.word_embeddings.weight  # tied in HF too
    with torch.no_grad():
        want = ref(**x).logits
    assert (bert_mlm(params, x["input_ids"], cfg, attention_mask=x["attention_mask"]) - want).abs().max() <= 1e-5


def test_bf16_on_request(hf_saved, tmp_path):
    d, ref = hf_saved["l2h4_relu_tt1", "classifier"]
    p32, cfg = load_bert(d, head="classifier")
    p16, _ = load_bert(d, head="classifier", dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in tree_leaves(p16))
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(tree_leaves(p32), tree_leaves(p16)))
    x = inputs(cfg)
    with torch.no_grad():
        want = ref(**x).logits
    got = bert_classifier(
        p16, x["input_ids"], cfg, attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
    )
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.05
    save_bert(p16, cfg, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back, _ = load_bert(tmp_path / "bf16", head="classifier")
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(back), tree_leaves(p16)))
    ref16 = hf_loads(transformers.BertForSequenceClassification, tmp_path / "bf16")
    assert next(ref16.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Bad checkpoints and failed saves
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(hf_saved, tmp_path):
    """A writable copy of a transformers BertModel checkpoint."""
    d, _ = hf_saved["l2h4_relu_tt1", "none"]
    shutil.copytree(d, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def rewrite(path, edit):
    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_bert(ckpt)
    assert str(f) in str(e.value)


def test_not_a_safetensors_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_text("this is not a checkpoint, just some text that is long enough")
    with pytest.raises(CheckpointError, match="not a safetensors file") as e:
        load_bert(ckpt)
    assert str(f) in str(e.value)


def test_missing_and_unexpected_keys_reported_together(ckpt):
    rewrite(
        ckpt,
        lambda sd: (
            sd.pop("encoder.layer.1.attention.self.key.bias"),
            sd.__setitem__("encoder.layer.0.attention.self.extra", torch.zeros(3)),
        ),
    )
    with pytest.raises(CheckpointError) as e:
        load_bert(ckpt)
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "missing keys (1)" in msg and "encoder.layer.1.attention.self.key.bias" in msg
    assert "unexpected keys (1)" in msg and "encoder.layer.0.attention.self.extra" in msg


def test_unexpected_key_strict_and_lenient(ckpt):
    rewrite(ckpt, lambda sd: sd.__setitem__("encoder.layer.0.attention.self.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): encoder.layer.0.attention.self.extra"):
        load_bert(ckpt)
    with pytest.warns(UserWarning, match="encoder.layer.0.attention.self.extra"):
        params, cfg = load_bert(ckpt, strict=False)
    assert params["encoder"]["layers"][0]["attn"]["q"]["weight"].shape == (32, 4, 8)


def test_wrong_shape(ckpt):
    rewrite(ckpt, lambda sd: sd.__setitem__("encoder.layer.1.intermediate.dense.weight", torch.zeros(47, 32)))
    with pytest.raises(CheckpointError) as e:
        load_bert(ckpt)
    msg = str(e.value)
    assert "model.safetensors: encoder.layer.1.intermediate.dense.weight" in msg
    assert "(48, 32) [intermediate_size, hidden_size]" in msg and "found (47, 32)" in msg


def test_config_disagrees_with_tensors(ckpt):
    c = json.loads((ckpt / "config.json").read_text())
    c["hidden_size"] = 64
    (ckpt / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError) as e:
        load_bert(ckpt)
    msg = str(e.value)
    assert "config.json" in msg and "embeddings.word_embeddings.weight" in msg
    assert "expected shape (61, 64) [vocab_size, hidden_size]" in msg and "found (61, 32)" in msg
    c["hidden_size"] = 32
    c["position_embedding_type"] = "relative_key_query"
    (ckpt / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="config.json.*position_embedding_type"):
        load_bert(ckpt)


def test_no_weights_and_no_config(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found") as e:
        load_bert(ckpt)
    assert str(ckpt) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        load_bert(empty)
    with pytest.raises(CheckpointError, match="no such"):
        load_bert(tmp_path / "nope")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(ckpt.parent / "ckpt" / "config.json", lone / "other.json")
    (lone / "w.safetensors").write_bytes(b"")
    save_file({"x": torch.zeros(1)}, str(lone / "w.safetensors"))
    with pytest.raises(CheckpointError, match="config"):
        load_bert(lone / "w.safetensors")


def test_pickle_checkpoints_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    bad = ckpt / "pytorch_model.bin"
    bad.write_bytes(b"\x80\x04 not even a valid pickle: it must never be opened")
    with pytest.raises(CheckpointError, match="pickle") as e:
        load_bert(ckpt)
    assert str(bad) in str(e.value) and "save_file" in str(e.value)  # says how to convert
    with pytest.raises(CheckpointError, match="pickle"):
        load_bert(bad, config=ckpt / "config.json")
    alone = ckpt.parent / "alone.pt"
    shutil.move(bad, alone)
    with pytest.raises(CheckpointError, match="pickle"):  # refused before looking for a config
        load_bert(alone)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    cfg = BertConfig(
        vocab_size=61,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
    )
    params = init_bert(random.key(0), cfg)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(hf_io, "write_json", boom)  # after model.safetensors is written
    with pytest.raises(OSError, match="simulated"):
        save_bert(params, cfg, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # an existing directory survives a failed overwrite untouched
    monkeypatch.undo()
    save_bert(params, cfg, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(hf_io, "write_json", boom)
    with pytest.raises(OSError):
        save_bert(init_bert(random.key(1), cfg), cfg, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_rejects_params_that_disagree_with_config(tmp_path):
    cfg = BertConfig(
        vocab_size=61,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
    )
    params = init_bert(random.key(0), cfg)
    with pytest.raises(ValueError, match="intermediate|ffn.w1.weight"):
        save_bert(params, dataclasses.replace(cfg, intermediate_size=30), tmp_path / "x")
    params["extra"] = {"weight": torch.zeros(2)}
    with pytest.raises(ValueError, match="extra.weight"):
        save_bert(params, cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="head"):
        save_bert(init_bert(random.key(0), cfg), cfg, tmp_path / "x", head="classifier")
    with pytest.raises(ValueError, match="tokenizer"):
        save_bert(init_bert(random.key(0), cfg), cfg, tmp_path / "x", tokenizer_dir=tmp_path)
    assert not (tmp_path / "x").exists()
