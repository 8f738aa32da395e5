"""examples/finetune_imdb.py --lora-rank: trains adapters + classifier only, writes a peft adapter
directory that peft loads (same logits), and with --merge a plain checkpoint; --predict takes either."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CLASSIFY, run_script

from fnlm.data import load_imdb, load_tokenizer
from fnlm.models import bert_classifier, load_bert

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_lora_rank_4_end_to_end_and_peft_reloads(small_archive, minilm_dir, tmp_path):  # noqa: F811
    out = tmp_path / "runs" / "lora"
    proc = run_script(
        "--data",
        small_archive,
        "--weights",
        minilm_dir,
        "--train-size",
        0,
        "--test-size",
        0,
        "--max-len",
        64,
        "--batch-size",
        8,
        "--epochs",
        1,
        "--no-compile",
        "--dtype",
        "fp32",
        "--lora-rank",
        4,
        "--merge",
        "--remat",
        "--out",
        out,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "vocab.txt",
        "metrics.json",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/vocab.txt",
    ):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lora"]["rank"] == 4 and metrics["remat"] == "nothing"
    assert metrics["trainable_params"] / metrics["model_params"] < 0.01

    test = load_imdb(small_archive, "test")
    texts = [t.replace("<br />", " ") for t in test.texts]
    enc = load_tokenizer(out).encode(texts, max_len=64, truncation="head+tail")
    base = transformers.BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    merged, cfg = load_bert(out / "merged", head="classifier")
    with torch.no_grad():
        theirs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        ours = bert_classifier(merged, enc["input_ids"], cfg, attention_mask=enc["attention_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    correct = int((theirs.argmax(-1) == torch.tensor(test.labels)).sum())
    assert correct == round(metrics["final_test_accuracy"] * len(texts))

    # classify.py --predict on the adapter directory: the probabilities peft gives
    proc = run_script("--model", out, "--predict", *test.texts[:2], timeout=120, script=CLASSIFY)
    assert proc.returncode == 0, proc.stderr
    probs = torch.softmax(theirs[:2], -1)
    for line, p in zip(proc.stdout.strip().splitlines(), probs):
        label, prob, _ = line.split("\t")
        assert label == ("neg", "pos")[int(p.argmax())] and float(prob) == pytest.approx(float(p.max()), abs=1e-4)


def test_lora_bad_flags_are_one_line_errors(small_archive, minilm_dir, tmp_path):  # noqa: F811
    proc = run_script(
        "--data",
        small_archive,
        "--weights",
        minilm_dir,
        "--train-size",
        0,
        "--test-size",
        0,
        "--lora-rank",
        4,
        "--lora-targets",
        "*.attn.query",
        "--no-compile",
        "--out",
        tmp_path / "x",
        timeout=120,
    )
    assert proc.returncode == 2 and "matches no linear map" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_script("--merge", "--out", tmp_path / "y", timeout=60)
    assert proc.returncode == 2 and "go with --lora-rank" in proc.stderr


def test_lora_gets_its_own_default_learning_rate():
    """Adapters start at B = 0 with 0.3% of the parameters: the full fine-tuning lr (1e-4) left the
    default LoRA run at chance, so --lora-rank has its own default; an explicit --lr wins."""

    def lr(*flags):
        proc = run_script(*flags, "--print-config", timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["lr"]

    assert lr() == 1e-4 and lr("--lora-rank", "8") == 3e-3 and lr("--lora-rank", "8", "--lr", "5e-4") == 5e-4


@pytest.mark.slow
def test_lora_run_learns(imdb_archive, minilm_dir, tmp_path):  # noqa: F811
    """--lora-rank 8 with its default lr on 400 training reviews (128 tokens, 3 epochs): well above chance on
    400 test reviews (the default run's accuracy is on the benchmarks page)."""
    out = tmp_path / "lora"
    proc = run_script(
        "--data",
        imdb_archive,
        "--weights",
        minilm_dir,
        "--lora-rank",
        8,
        "--train-size",
        400,
        "--test-size",
        400,
        "--max-len",
        128,
        "--epochs",
        3,  # 75 steps: after 1 epoch (25 steps) the adapters were at chance (0.53); validation 0.925 after 3 of 4
        "--no-compile",  # learning only: the compiled step is proven by the other slow tests
        "--out",
        out,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_size"] == 400 and metrics["train_size"] == 400 and metrics["lora"]["rank"] == 8
    assert metrics["final_test_accuracy"] >= 0.70, metrics["evals"]
