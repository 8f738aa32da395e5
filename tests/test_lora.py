"""LoRA (fnlm.nn.init_lora / merge_lora) and peft's adapter layout (fnlm.models.save_lora / load_lora).

The reference is peft itself: adapters written by fnlm are loaded by ``PeftModel.from_pretrained``
on the same base checkpoint and must give fnlm's logits; adapters written by peft are loaded by
fnlm and must give peft's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from einops import rearrange

import fnlm
from fnlm import random
from fnlm.io import CheckpointError
from fnlm.models import (
    bert_classifier,
    init_bert_classifier,
    load_bert,
    load_lora,
    read_lora_config,
    save_bert,
    save_lora,
)
from fnlm.nn import LoraConfig, init_lora, lora_targets, merge_lora
from fnlm.tree import flatten_names, partition, tree_map

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

CFG = fnlm.BertConfig(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    num_labels=3,
)


def batch(seed=0, b=3, n=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CFG.vocab_size, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, 7:] = 0
    return ids, mask


def random_b(adapters, seed=5):
    """Adapters with a non-zero B (a trained-looking adapter)."""
    g = torch.Generator().manual_seed(seed)
    return tree_map(lambda x: torch.randn(x.shape, generator=g) * 0.3, adapters)


def test_b_zero_is_exactly_the_base_model():
    params = init_bert_classifier(random.key(0), CFG)
    lcfg = LoraConfig(rank=4, alpha=8)
    adapters = init_lora(random.key(1), params, lcfg)
    assert set(flatten_names(adapters)) == {
        f"bert.encoder.layers.{i}.attn.{m}.lora_{f}" for i in range(2) for m in "qv" for f in "AB"
    }
    a = adapters["bert"]["encoder"]["layers"][0]["attn"]["q"]
    assert a["lora_A"].shape == (16, 4) and a["lora_B"].shape == (4, 16) and not a["lora_B"].any()
    assert a["lora_A"].abs().max() <= 1 / 4 and a["lora_A"].std() > 0  # U(-1/sqrt(d_in), 1/sqrt(d_in))
    ids, mask = batch()
    base = bert_classifier(params, ids, CFG, attention_mask=mask)
    assert torch.equal(bert_classifier(merge_lora(params, adapters, lcfg), ids, CFG, attention_mask=mask), base)


def test_merged_weight_is_the_low_rank_update_written_out():
    """x W' == x W + (alpha/r) (x A) B, for a 2-D linear and for the [d, heads, d_k] attention query."""
    params = init_bert_classifier(random.key(0), CFG)
    lcfg = LoraConfig(rank=2, alpha=6, targets=("*.layers.1.attn.q", "*.ffn.w1", "*.attn.o"))
    assert lora_targets(params, lcfg)["bert.encoder.layers.0.attn.o"] == (16, 16)
    adapters = random_b(init_lora(random.key(1), params, lcfg))
    merged = merge_lora(params, adapters, lcfg)
    x = torch.randn(5, 16)
    for path, flat in (("bert.encoder.layers.0.ffn.w1", False), ("bert.encoder.layers.1.attn.q", True)):
        w = flatten_names(params)[path + ".weight"]
        a, b = flatten_names(adapters)[path + ".lora_A"], flatten_names(adapters)[path + ".lora_B"]
        w2 = rearrange(w, "d h k -> d (h k)") if flat else w
        want = x @ w2 + 3.0 * ((x @ a) @ b)
        got = flatten_names(merged)[path + ".weight"]
        got = x @ (rearrange(got, "d h k -> d (h k)") if flat else got)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    untouched = flatten_names(merged)["bert.encoder.layers.0.attn.q.weight"]
    assert torch.equal(untouched, flatten_names(params)["bert.encoder.layers.0.attn.q.weight"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora") / "base"
    save_bert(init_bert_classifier(random.key(0), CFG), CFG, d)
    return d


def test_fnlm_adapter_loads_in_peft_with_the_same_logits(base_dir, tmp_path):
    params, cfg = load_bert(base_dir, head="classifier")
    lcfg = LoraConfig(rank=4, alpha=8, targets=("*.attn.q", "*.attn.v", "*.layers.1.ffn.w2", "*.attn.o"))
    adapters = random_b(init_lora(random.key(1), params, lcfg))
    head = {"weight": torch.randn(16, 3), "bias": torch.randn(3)}  # a trained classifier
    tuned = dict(params, classifier=head)
    save_lora(tmp_path / "ad", adapters, lcfg, cfg, head=head, base_model_name_or_path=str(base_dir))
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.output.dense",
        "query",
        "value",
    ]
    assert conf["modules_to_save"] == ["classifier", "score"] and conf["r"] == 4 and conf["lora_alpha"] == 8
    ids, mask = batch()
    ours = bert_classifier(merge_lora(tuned, adapters, lcfg), ids, cfg, attention_mask=mask)
    base = transformers.BertForSequenceClassification.from_pretrained(base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        # peft's merge_and_unload == fnlm's merge saved as a plain checkpoint
        merged_hf = model.merge_and_unload()(input_ids=ids, attention_mask=mask).logits
    save_bert(merge_lora(tuned, adapters, lcfg), cfg, tmp_path / "merged")
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits, merged_hf, rtol=1e-4, atol=1e-5)


def test_peft_adapter_loads_in_fnlm_with_the_same_logits(base_dir, tmp_path):
    base = transformers.BertForSequenceClassification.from_pretrained(base_dir)
    conf = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=3,
        lora_alpha=5,
        lora_dropout=0.1,
        init_lora_weights=False,
        target_modules=["query", "key", "value", "dense"],
    )
    model = peft.get_peft_model(base, conf)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    model.save_pretrained(tmp_path / "ad")
    ids, mask = batch(1)
    with torch.no_grad():
        theirs = model.eval()(input_ids=ids, attention_mask=mask).logits
    params, cfg = load_bert(base_dir, head="classifier")
    adapters, lcfg, head = load_lora(tmp_path / "ad", params, cfg)
    assert (lcfg.rank, lcfg.alpha, lcfg.dropout) == (3, 5.0, 0.1) and head is not None
    assert len(lcfg.targets) == 2 * 6 + 1  # q, k, v, attention-output/intermediate/output dense per layer + pooler
    ours = bert_classifier(merge_lora(dict(params, classifier=head), adapters, lcfg), ids, cfg, attention_mask=mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_lora_training_step_moves_only_adapters_and_head():
    params = init_bert_classifier(random.key(0), CFG)
    lcfg = LoraConfig(rank=2)
    trainable = {"lora": init_lora(random.key(1), params, lcfg)}
    head, frozen = partition(params, "classifier.*")
    trainable["head"] = head

    def loss_fn(tr, b, key):
        p = merge_lora(fnlm.tree.combine(tr["head"], frozen), tr["lora"], lcfg)
        return fnlm.classifier_loss(p, b, CFG, key=key, train=True)

    opt = fnlm.optim.adamw(1e-2)
    step = fnlm.make_train_step(loss_fn, opt, compile=False)
    ids, mask = batch()
    b = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}
    one, state, m = step(trainable, opt.init(trainable), b, random.key(2))
    two, _, _ = step(one, state, b, random.key(3))
    assert torch.isfinite(m["loss"])
    before, after1, after2 = flatten_names(trainable), flatten_names(one), flatten_names(two)
    for n in before:  # with B = 0 the first gradient of A is 0 (dL/dA = s x^T dy B^T): A moves from step 2
        moved_first = not torch.equal(after1[n], before[n])
        assert moved_first == (not n.endswith("lora_A")), n
        assert not torch.equal(after2[n], after1[n]), n


def test_bad_input_is_a_one_line_error(base_dir, tmp_path):
    params = init_bert_classifier(random.key(0), CFG)
    cases = [
        (
            lambda: init_lora(random.key(0), params, LoraConfig(targets=("*.attn.query",))),
            ValueError,
            r"LoRA target '\*\.attn\.query' matches no linear map",
        ),
        (
            lambda: init_lora(random.key(0), params, LoraConfig(rank=17)),
            ValueError,
            r"LoRA rank 17 is above the width of bert\.encoder\.layers\.0\.attn\.q",
        ),
        (lambda: LoraConfig(rank=0), ValueError, "rank must be a positive int"),
        (
            lambda: init_lora(random.key(0), params, LoraConfig(dropout=0.1)),
            ValueError,
            r"LoraConfig.dropout=0.1: dropout on the adapter input is not implemented",
        ),
    ]
    lcfg = LoraConfig(rank=2)
    save_lora(tmp_path / "ad", init_lora(random.key(1), params, lcfg), lcfg, CFG)
    other = fnlm.BertConfig(
        vocab_size=60,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    cases.append(
        (
            lambda: load_lora(tmp_path / "ad", init_bert_classifier(random.key(0), other), other),
            CheckpointError,
            r"has shape \(2, 16\) but the base model's bert\.encoder\.layers\.0\.attn\.q",
        )
    )
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    conf.update(use_dora=True, bias="lora_only")
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(conf))
    cases.append(
        (
            lambda: read_lora_config(tmp_path / "dora"),
            CheckpointError,
            r"peft features fnlm does not implement: use_dora=True, bias='lora_only'",
        )
    )
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as e:
            fn()
        assert "\n" not in str(e.value)


def test_save_lora_copies_the_tokenizer_files(base_dir, tmp_path):
    params, cfg = load_bert(base_dir, head="classifier")
    lcfg = LoraConfig(rank=2)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    (tok / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    save_lora(tmp_path / "ad", init_lora(random.key(1), params, lcfg), lcfg, cfg, tokenizer_dir=tok)
    for name in ("vocab.txt", "tokenizer_config.json"):
        assert (tmp_path / "ad" / name).read_bytes() == (tok / name).read_bytes()
    assert load_lora(tmp_path / "ad", params, cfg)[1].rank == 2
    with pytest.raises(ValueError, match="tokenizer_dir"):  # nothing to copy is an error, and nothing is written
        save_lora(tmp_path / "ad2", init_lora(random.key(1), params, lcfg), lcfg, cfg, tokenizer_dir=tmp_path / "x")
    assert not (tmp_path / "ad2").exists()
