"""examples/finetune_imdb.py's command line and run directory, as a user meets them: one typed config
(flags, --config files, --print-config), one-line errors before any work, the run's record while it
runs (metrics.jsonl), its model card and environment, extending a finished run, --clip 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, SCRIPT, popen_example, run_script, write_imdb_archive
from safetensors.torch import load_file

# 16 training reviews in batches of 4: 4 steps an epoch on a tiny random BERT, eagerly
TINY = (
    "--train-size",
    16,
    "--test-size",
    8,
    "--val-size",
    4,
    "--max-len",
    32,
    "--batch-size",
    4,
    "--dtype",
    "fp32",
    "--no-compile",
)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err, proc.stderr[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# Nothing exists at these paths: an error about them would mean the script got as far as loading.
NOWHERE = ("--data", "/nonexistent/imdb.tar.gz", "--weights", "/nonexistent/bert")


@pytest.mark.parametrize(
    "args, named",
    [
        (("--lr", "-1e-4"), "--lr must be > 0, got -0.0001"),
        (("--lr=-1e-4",), "--lr must be > 0, got -0.0001"),
        (("--weight-decay", "-1"), "--weight-decay must be >= 0"),
        (("--clip", "-1"), "--clip must be >= 0"),
        (("--warmup", "1.5"), "--warmup must be in [0, 1)"),
        (("--batch-size", "0"), "--batch-size must be >= 1"),
        (("--buckets", "many"), "--buckets must be auto or a number"),
        (("--epochs", "two"), "--epochs: invalid int value"),
        (("--truncation", "tail"), "--truncation: invalid choice"),
        (("--merge",), "--merge go with --lora-rank"),
        (("--remat", "matmuls"), "--remat matmuls runs eagerly only"),
        (("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
        (("--report-to", "wandb"), "--report-to: invalid choice"),
    ],
)
def test_bad_flags_are_one_line_before_any_work(tmp_path, args, named):
    out = tmp_path / "runs" / "x"
    err = one_error_line(run_script(*NOWHERE, *args, "--out", out, timeout=120))
    assert named in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_unwritable_out_is_found_before_loading(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = one_error_line(run_script(*NOWHERE, "--out", blocker / "run", timeout=120))
    assert err.startswith(f"error: --out {blocker / 'run'}: cannot write")


def test_failed_start_leaves_nothing_that_blocks_the_rerun(archive, tmp_path):
    out = tmp_path / "runs" / "x"
    err = one_error_line(
        run_script(
            "--data",
            archive,
            "--train-size",
            0,
            "--test-size",
            0,
            "--weights",
            tmp_path / "missing",
            "--out",
            out,
            timeout=120,
        )
    )
    assert str(tmp_path / "missing") in err
    assert list((tmp_path / "runs").iterdir()) == []  # neither runs/x nor runs/.x.partial


def test_config_file_flags_print_config_and_the_stored_config_agree(archive, tiny_bert, tmp_path):
    conf = tmp_path / "run.json"
    conf.write_text(
        json.dumps(
            {
                "train_size": 16,
                "test_size": 8,
                "val_size": 4,
                "max_len": 32,
                "batch_size": 4,
                "lr": 5e-3,
                "dtype": "fp32",
                "compile": False,
                "data": str(archive),
                "weights": str(tiny_bert),
            }
        )
    )
    shown = run_script("--config", conf, "--lr", "2e-3", "--print-config", timeout=120)
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert printed["lr"] == 2e-3 and printed["train_size"] == 16 and printed["compile"] is False
    out = tmp_path / "run"
    proc = run_script("--config", conf, "--lr", "2e-3", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stored = json.loads((out / "run_config.json").read_text())
    assert stored == printed | {"out": str(out)}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": "fast"}))
    assert "--lr must be a number" in one_error_line(run_script("--config", bad, timeout=60))
    bad.write_text(json.dumps({"learning_rate": 1e-3}))
    assert "unknown setting 'learning_rate'" in one_error_line(run_script("--config", bad, timeout=60))


def test_help_shows_every_default_and_no_none():
    proc = run_script("--help", timeout=60)
    assert proc.returncode == 0 and "(default: None)" not in proc.stdout
    assert "--lr" in proc.stdout and "(default: 16)" in proc.stdout and "--print-config" in proc.stdout


def test_resume_with_a_larger_epochs_extends_a_finished_run(archive, tiny_bert, tmp_path):
    """--schedule constant --warmup 0: the rate does not depend on the total, so one epoch then
    --resume --epochs 2 is bitwise the two-epoch run. (With the default linear schedule, extending
    re-plans the decay over the new total from the resumed step on; the steps taken keep their rates.)"""
    common = (
        "--data",
        archive,
        "--weights",
        tiny_bert,
        *TINY,
        "--schedule",
        "constant",
        "--warmup",
        0,
        "--lr",
        "3e-3",
        "--eval-every",
        0,
    )
    two = run_script(*common, "--epochs", 2, "--out", tmp_path / "two", timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = run_script(*common, "--epochs", 1, "--out", tmp_path / "one", timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    refused = run_script("--resume", tmp_path / "one", timeout=60)
    assert "is a finished run; to train it further give a larger --epochs" in one_error_line(refused)
    assert "--lr differs" in one_error_line(run_script("--resume", tmp_path / "one", "--epochs", 2, "--lr", "1e-3"))
    ext = run_script("--resume", tmp_path / "one", "--epochs", 2, timeout=300)
    assert ext.returncode == 0 and "resumed from" in ext.stdout, ext.stderr[-2000:]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("two", "one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert ma["train_loss_per_step"] == mb["train_loss_per_step"] and mb["steps"] == 8
    assert json.loads((tmp_path / "one" / "run_config.json").read_text())["epochs"] == 2


def test_clip_zero_is_no_clipping_and_learns(archive, minilm_dir, tmp_path):
    common = (
        "--data",
        archive,
        "--weights",
        minilm_dir,
        "--train-size",
        0,
        "--test-size",
        8,
        "--max-len",
        32,
        "--batch-size",
        8,
        "--epochs",
        2,
        "--dtype",
        "fp32",
        "--no-compile",
        "--eval-every",
        0,
    )
    runs = {}
    for clip in ("0", "inf"):
        proc = run_script(*common, "--clip", clip, "--out", tmp_path / clip, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[clip] = json.loads((tmp_path / clip / "metrics.json").read_text())
    assert runs["0"]["train_loss_per_step"] == runs["inf"]["train_loss_per_step"]
    epochs = runs["0"]["epochs"]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"], epochs


def test_metrics_jsonl_grows_while_the_run_goes_and_the_outputs_describe_it(archive, tiny_bert, tmp_path):
    import yaml

    out = tmp_path / "run"
    p = popen_example(
        SCRIPT, "--data", archive, "--weights", tiny_bert, *TINY, "--epochs", 3, "--eval-every", 2, "--out", out
    )
    log = tmp_path / ".run.partial" / "metrics.jsonl"
    t0 = time.time()
    seen = []
    while p.poll() is None and time.time() - t0 < 300:  # read from this (second) process mid-run
        if log.exists():
            seen = [json.loads(ln) for ln in log.read_text().splitlines() if ln.endswith("}")]
            if len(seen) >= 3:
                break
        time.sleep(0.02)
    assert len(seen) >= 3 and p.poll() is None, "the log did not grow while the run was going"
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    assert f"run directory: {tmp_path / '.run.partial'}" in stdout
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13)) and all(r["loss"] > 0 for r in train)
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [2, 4, 6, 8, 10, 12]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["loss"] for r in train] == metrics["train_loss_per_step"]

    card = (out / "README.md").read_text()
    front = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", card, re.S).group(1))
    assert front["base_model"] == str(tiny_bert) and front["datasets"] == ["imdb"]
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "fnlm"
    results = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert results["accuracy"] == pytest.approx(metrics["final_test_accuracy"])
    lo, hi = metrics["test_accuracy_95ci"]
    assert (results["accuracy_95ci_low"], results["accuracy_95ci_high"]) == pytest.approx((lo, hi))
    assert "- lr: 0.0001" in card and "- torch " in card  # hyper-parameters, framework versions
    env = json.loads((out / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__


def test_report_to_tensorboard(archive, tiny_bert, tmp_path):
    proc = run_script(
        "--data",
        archive,
        "--weights",
        tiny_bert,
        *TINY,
        "--report-to",
        "tensorboard",
        "--out",
        tmp_path / "run",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_report_to_tensorboard_without_it_installed(tmp_path):
    shadow = tmp_path / "shadow" / "tensorboard"  # an import of tensorboard fails, as where it is not installed
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *NOWHERE, "--report-to", "tensorboard", "--out", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "pip install tensorboard" in one_error_line(proc)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_no_test_or_benchmark_loads_an_example_by_path():
    """Tests of the maths test the library; tests of the scripts run them."""
    offenders = []
    for path in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"(spec_from_file_location|run_path)\(", text):  # the ways to import a file by path
            window = text[m.start() : m.start() + 200]
            if "examples" in window:
                offenders.append(f"{path.relative_to(ROOT)}: {window.splitlines()[0][:80]}")
    assert not offenders, offenders
