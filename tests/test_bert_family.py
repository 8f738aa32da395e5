"""RoBERTa and DistilBERT against transformers on random weights with odd configurations (padding
index 3, sinusoidal positions): logits, loss and gradients of the HF checkpoint loaded into fnlm,
and from_pretrained on what fnlm saves."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from fnlm import random
from fnlm.io import CheckpointError
from fnlm.models import (
    DistilBertConfig,
    distilbert,
    distilbert_classifier,
    init_distilbert,
    init_distilbert_classifier,
    load_distilbert,
    load_roberta,
    roberta,
    roberta_classifier,
    save_distilbert,
    save_roberta,
    sequence_classifier_loss,
)

PAD = 3


def hf_roberta_config(**kw):
    return transformers.RobertaConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=24,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"},
        label2id={"neg": 0, "neu": 1, "pos": 2},
        **kw,
    )


def hf_distil_config(**kw):
    return transformers.DistilBertConfig(
        vocab_size=60,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=40,
        max_position_embeddings=24,
        sinusoidal_pos_embds=True,
        pad_token_id=2,
        num_labels=3,
        **kw,
    )


def batch(pad):
    ids = torch.tensor([[0, 11, 12, 13, 14, 15, 2], [0, 21, 22, 2, pad, pad, pad]])
    return ids, (ids != pad).long(), torch.tensor([2, 0])


def perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():  # biases and LayerNorms away from 0/1 so that every mapping is visible
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def grads_by_hf_name(save, grads, cfg, tmp_path):
    """fnlm gradients under HF names, through the saver's mapping (same layout changes as the params)."""
    return load_file(str(save(grads, cfg, tmp_path / "grads") / "model.safetensors"))


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_classifier_logits_loss_and_grads_match_transformers(family, tmp_path):
    if family == "roberta":
        ref = perturbed(transformers.RobertaForSequenceClassification(hf_roberta_config()))
        load, save, fwd, pad = load_roberta, save_roberta, roberta_classifier, PAD
    else:
        ref = perturbed(transformers.DistilBertForSequenceClassification(hf_distil_config()))
        load, save, fwd, pad = load_distilbert, save_distilbert, distilbert_classifier, 2
    ref.save_pretrained(str(tmp_path / "hf"))
    params, cfg = load(tmp_path / "hf", head="classifier")
    assert cfg.labels == (("neg", "neu", "pos") if family == "roberta" else ("LABEL_0", "LABEL_1", "LABEL_2"))
    ids, mask, labels = batch(pad)
    out = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    logits = fwd(params, ids, cfg, attention_mask=mask)
    assert (logits - out.logits).abs().max() <= 1e-5
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    grads, (loss, _) = torch.func.grad_and_value(lambda p: sequence_classifier_loss(p, b, cfg), has_aux=True)(params)
    assert abs(float(loss) - float(out.loss.detach())) <= 1e-5
    got = grads_by_hf_name(save, grads, cfg, tmp_path)
    named = dict(ref.named_parameters())
    compared = 0
    for name, g in got.items():
        if named[name].grad is None:
            continue
        assert (g - named[name].grad).abs().max() <= 1e-5 * max(1.0, named[name].grad.abs().max()), name
        compared += 1
    assert compared >= len(got) - 1
    # what fnlm saves, transformers loads: same logits, labels in config.json
    d = save(params, cfg, tmp_path / "fnlm")
    again = type(ref).from_pretrained(str(d)).eval()
    with torch.no_grad():
        assert (again(input_ids=ids, attention_mask=mask).logits - logits).abs().max() <= 1e-5
    assert json.loads((d / "config.json").read_text())["model_type"] == family
    assert again.config.id2label == ref.config.id2label


def test_roberta_model_with_pooler_and_offset_positions(tmp_path):
    ref = perturbed(transformers.RobertaModel(hf_roberta_config()))
    ref.save_pretrained(str(tmp_path / "hf"))
    params, cfg = load_roberta(tmp_path / "hf")
    assert "pooler" in params and cfg.pad_token_id == PAD and cfg.max_len == 24 - PAD - 1
    ids, mask, _ = batch(PAD)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask)
    h, pooled = roberta(params, ids, cfg, attention_mask=mask)
    real = mask.bool()
    assert (h - want.last_hidden_state)[real].abs().max() <= 1e-5
    assert (pooled - want.pooler_output).abs().max() <= 1e-5
    save_roberta(params, cfg, tmp_path / "fnlm")
    again = transformers.RobertaModel.from_pretrained(str(tmp_path / "fnlm")).eval()
    with torch.no_grad():
        assert (again(input_ids=ids, attention_mask=mask).pooler_output - pooled).abs().max() <= 1e-5


def test_distilbert_model_and_its_sinusoidal_init(tmp_path):
    ref = perturbed(transformers.DistilBertModel(hf_distil_config()))
    ref.save_pretrained(str(tmp_path / "hf"))
    params, cfg = load_distilbert(tmp_path / "hf")
    assert cfg.sinusoidal_pos_embds and set(params["embeddings"]) == {"word", "position", "norm"}
    ids, mask, _ = batch(2)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (distilbert(params, ids, cfg, attention_mask=mask) - want)[mask.bool()].abs().max() <= 1e-5
    fresh = transformers.DistilBertModel(hf_distil_config())
    ours = init_distilbert(random.key(0), cfg)["embeddings"]["position"]["weight"]
    assert (ours - fresh.embeddings.position_embeddings.weight).abs().max() <= 1e-6


def test_head_key_initialises_a_missing_classifier_and_errors_name_the_file(tmp_path):
    ref = transformers.RobertaModel(hf_roberta_config())
    ref.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="head_key=fnlm.random.key"):
        load_roberta(tmp_path / "hf", head="classifier")
    params, cfg = load_roberta(tmp_path / "hf", head="classifier", head_key=random.key(1))
    assert params["classifier"]["out_proj"]["weight"].shape == (32, 3)
    bad = dict(hf_roberta_config().to_dict(), hidden_size=48, num_attention_heads=4)
    with pytest.raises(CheckpointError, match="model.safetensors.*expected shape"):
        load_roberta(tmp_path / "hf", config=bad)
    p = init_distilbert_classifier(
        random.key(0), DistilBertConfig(vocab_size=60, dim=32, n_layers=1, n_heads=4, hidden_dim=40, num_labels=4)
    )
    d = save_distilbert(
        p, DistilBertConfig(vocab_size=60, dim=32, n_layers=1, n_heads=4, hidden_dim=40, num_labels=4), tmp_path / "d"
    )
    assert transformers.DistilBertForSequenceClassification.from_pretrained(str(d)).config.num_labels == 4


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_load_classifier_dispatches_on_model_type(family, tmp_path):
    from fnlm.models import any_classifier_loss, classifier_logits, load_classifier, save_classifier

    if family == "bert":
        hc = transformers.BertConfig(
            vocab_size=60,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=24,
            num_labels=3,
        )
        ref, pad = transformers.BertForSequenceClassification(hc), 0
    elif family == "roberta":
        ref, pad = transformers.RobertaForSequenceClassification(hf_roberta_config()), PAD
    else:
        ref, pad = transformers.DistilBertForSequenceClassification(hf_distil_config()), 2
    perturbed(ref).save_pretrained(str(tmp_path / "hf"))
    params, cfg = load_classifier(tmp_path / "hf")
    ids, mask, labels = batch(pad)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert (classifier_logits(params, ids, cfg, attention_mask=mask) - want.logits).abs().max() <= 1e-5
    loss, _ = any_classifier_loss(params, {"input_ids": ids, "attention_mask": mask, "labels": labels}, cfg)
    assert abs(float(loss) - float(want.loss)) <= 1e-5
    d = save_classifier(params, cfg, tmp_path / "fnlm")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(str(d)).eval()
    assert type(again) is type(ref)
    with torch.no_grad():
        assert (again(input_ids=ids, attention_mask=mask).logits - want.logits).abs().max() <= 1e-5
