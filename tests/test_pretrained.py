"""load_pretrained: heads, fresh heads, max_len, typed errors, LoRA adapter directories."""

import pytest
import torch

import fnlm
from fnlm import random
from fnlm.io import CheckpointError, MissingHeadError
from fnlm.models import (
    Pretrained,
    init_bert_classifier,
    init_bert_mlm,
    load_bert,
    load_lora,
    load_pretrained,
    save_bert,
    save_lora,
)
from fnlm.nn import LoraConfig, init_lora, merge_lora
from fnlm.tree import flatten_names

CFG = fnlm.BertConfig(
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=2,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    tok = root / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]) + "\n"
    )
    save_bert(init_bert_mlm(random.key(0), CFG), CFG, root / "mlm", tokenizer_dir=tok)
    save_bert(init_bert_classifier(random.key(1), CFG), CFG, root / "cls", tokenizer_dir=tok)
    return root


def _same(a, b):
    fa, fb = flatten_names(a), flatten_names(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_heads_and_fresh_head(dirs):
    p = load_pretrained(dirs / "cls", head="classifier", max_len=32)
    assert isinstance(p, Pretrained) and not p.fresh_head and p.tokenizer.vocab_size == 40
    assert _same(p.params, load_bert(dirs / "cls", head="classifier")[0])
    with pytest.raises(MissingHeadError):
        load_pretrained(dirs / "mlm", head="classifier", pooler=False)
    q = load_pretrained(dirs / "mlm", head="classifier", pooler=False, head_key=random.key(3))
    assert q.fresh_head
    assert _same(q.params, load_bert(dirs / "mlm", head="classifier", pooler=False, head_key=random.key(3))[0])
    r = load_pretrained(dirs / "cls", head="mlm", head_key=random.key(3), pooler="if_present")
    assert r.fresh_head and "pooler" in r.params["bert"]
    s = load_pretrained(dirs / "mlm", head="mlm", pooler="if_present")
    assert not s.fresh_head and "pooler" not in s.params["bert"]


def test_errors(dirs, tmp_path):
    with pytest.raises(ValueError, match="--max-len 33 .*max_position_embeddings=32"):
        load_pretrained(dirs / "cls", head="classifier", max_len=33)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)


def test_lora_adapter_directory(dirs, tmp_path):
    params, cfg = load_bert(dirs / "cls", head="classifier")
    lcfg = LoraConfig(rank=2)
    adapters = {k: v + 0.1 for k, v in flatten_names(init_lora(random.key(1), params, lcfg)).items()}
    adapters = fnlm.tree.unflatten_names(adapters)
    head = {"weight": torch.randn(16, 2), "bias": torch.randn(2)}
    save_lora(
        tmp_path / "ad",
        adapters,
        lcfg,
        cfg,
        head=head,
        base_model_name_or_path=str(dirs / "cls"),
        tokenizer_dir=dirs / "tok",
    )
    p = load_pretrained(tmp_path / "ad", head="classifier", max_len=16)
    ad, lc, h = load_lora(tmp_path / "ad", params, cfg)
    assert _same(p.params, merge_lora(dict(params, classifier=h), ad, lc)) and not p.fresh_head
    with pytest.raises(CheckpointError, match="head='classifier'"):
        load_pretrained(tmp_path / "ad", head="mlm")
