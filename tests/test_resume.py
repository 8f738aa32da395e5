"""Runs that survive interruption: fnlm.train.RunCheckpoints / GracefulStop (library), and the
examples that use them (finetune_imdb.py, hello_fnlm.py) killed and resumed as a user would."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace as Namespace

import pytest
import torch
from helpers import (
    ROOT,
    SCRIPT,
    corrupt,
    fnlm_logits,
    popen_example,
    run_script,
    wait_for,
    write_imdb_archive,
)
from safetensors.torch import load_file

from fnlm import optim, random
from fnlm.train import GracefulStop, ResumeError, RunCheckpoints, digest


def _state(seed: int = 0):
    k1, k2 = random.split(random.key(seed))
    params = {"w": random.normal(k1, (3, 4)), "layers": [{"b": random.normal(k2, (4,))}]}
    opt = optim.adamw(1e-3)
    return params, opt.init(params)


def test_save_restore_keeps_last_k(tmp_path):
    params, opt_state = _state()
    run = RunCheckpoints(tmp_path / "run", {"lr": 1e-3}, keep=2)
    assert run.restore() is None  # a fresh run: nothing to resume
    for step in (10, 20, 30):
        run.save(params, opt_state, step, random.fold_in(random.key(0), step), {"pos": step // 10})
    assert [p.name for p in run.checkpoints()] == ["step-00000020", "step-00000030"]
    st = RunCheckpoints(tmp_path / "run", {"lr": 1e-3}).restore()
    assert st.step == 30 and st.extra == {"pos": 3} and st.best_params is None
    assert torch.equal(st.key, random.fold_in(random.key(0), 30))
    assert torch.equal(st.params["layers"][0]["b"], params["layers"][0]["b"])
    assert type(st.opt_state) is type(opt_state) and torch.equal(st.opt_state.count, opt_state.count)
    assert RunCheckpoints.peek(tmp_path / "run") == ({"lr": 1e-3}, {"pos": 3})
    assert len(run.seconds) == 3 and all(s > 0 for s in run.seconds)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_sums"])
def test_corrupted_latest_falls_back_with_warning(tmp_path, damage):
    params, opt_state = _state()
    run = RunCheckpoints(tmp_path, {"lr": 1e-3}, keep=3)
    run.save(params, opt_state, 1, random.key(1))
    params2 = {"w": params["w"] + 1, "layers": params["layers"]}
    latest = run.save(params2, opt_state, 2, random.key(2))
    f = latest / "tensors.safetensors"
    if damage == "flip":
        corrupt(f)
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    else:
        (latest / "checksums.json").unlink()
    with pytest.warns(RuntimeWarning, match="skipping checkpoint step-00000002"):
        st = run.restore()
    assert st.step == 1 and torch.equal(st.params["w"], params["w"])


def test_no_intact_checkpoint_is_a_clear_error_and_nothing_is_touched(tmp_path):
    params, opt_state = _state()
    run = RunCheckpoints(tmp_path, {}, keep=2)
    for step in (1, 2):
        corrupt(run.save(params, opt_state, step, random.key(0)) / "tensors.safetensors")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ResumeError, match=r"none of its 2 checkpoint\(s\) is intact.*checksum mismatch") as e:
            run.restore()
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("changed", [{"lr": 2e-3}, {"data": "sha256:other"}, {"extra_setting": 1}])
def test_different_configuration_names_the_setting(tmp_path, changed):
    params, opt_state = _state()
    config = {"lr": 1e-3, "data": "sha256:abc", "max-len": 64}
    RunCheckpoints(tmp_path, config).save(params, opt_state, 5, random.key(0))
    name = next(iter(changed))
    with pytest.raises(ResumeError, match=rf"^cannot resume .*: {name} differs") as e:
        RunCheckpoints(tmp_path, config | changed).restore()
    assert "\n" not in str(e.value)


def test_best_params_follow_the_checkpoints_that_refer_to_them(tmp_path):
    params, opt_state = _state()
    run = RunCheckpoints(tmp_path, {}, keep=2)
    bests = {s: {"w": params["w"] * s, "layers": params["layers"]} for s in (1, 3)}
    run.save(params, opt_state, 2, random.key(0), best=(1, bests[1]))
    run.save(params, opt_state, 4, random.key(0), best=(3, bests[3]))
    run.save(params, opt_state, 6, random.key(0), best=(3, bests[3]))
    # step 2 (the only one referring to best-step 1) was pruned, and best-step 1 with it
    assert sorted(p.name for p in run.dir.iterdir()) == ["best-step-00000003", "step-00000004", "step-00000006"]
    st = run.restore()
    assert st.step == 6 and torch.equal(st.best_params["w"], bests[3]["w"])
    assert torch.equal(st.best_params["layers"][0]["b"], params["layers"][0]["b"])


def test_digest_sees_values_dtypes_and_names():
    t = torch.arange(6.0).reshape(2, 3)
    d = digest({"a": t, "n": 3})
    assert d.startswith("sha256:") and d == digest({"a": t.clone(), "n": 3})
    assert (
        len(
            {
                d,
                digest({"a": t + 1e-6, "n": 3}),
                digest({"a": t.double(), "n": 3}),
                digest({"b": t, "n": 3}),
                digest({"a": t, "n": 4}),
            }
        )
        == 5
    )


def test_graceful_stop_first_signal_flags_second_interrupts():
    old = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is old


# ============================================================================= the examples, killed and resumed
# 16 training reviews in batches of 4 for 2 epochs = 8 steps, a checkpoint and a validation evaluation after
# each, on a tiny random BERT with MiniLM's vocabulary; this lr makes the best evaluation an early one (step 2)
TINY = (
    "--train-size",
    16,
    "--test-size",
    8,
    "--val-size",
    4,
    "--eval-every",
    1,
    "--max-len",
    32,
    "--batch-size",
    4,
    "--epochs",
    2,
    "--lr",
    "3e-2",
    "--warmup",
    0,
    "--dtype",
    "fp32",
    "--no-compile",
    "--save-every",
    1,
)
SAME = (
    "confusion_matrix",
    "evals",
    "final_test_accuracy",
    "kept",
    "per_class",
    "steps",
    "test_accuracy_95ci",
    "train_loss_per_step",
)


def assert_same_model(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for m in (ma, mb):  # timings differ, of course
        m["evals"] = [{k: v for k, v in e.items() if k != "seconds"} for e in m["evals"]]
    for k in SAME:
        assert ma[k] == mb[k], k


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz")


@pytest.fixture(scope="module")
def reference_run(archive, tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_script("--data", archive, "--weights", tiny_bert, *TINY, "--out", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigint_then_sigkill_then_corrupted_checkpoint_resume_to_the_uninterrupted_result(
    archive, tiny_bert, reference_run, tmp_path
):
    out, ck = tmp_path / "run", tmp_path / ".run.partial" / "checkpoints"
    # SIGINT: the step finishes, a checkpoint is written, one line says how to resume
    p = popen_example(SCRIPT, "--data", archive, "--weights", tiny_bert, *TINY, "--out", out)
    wait_for(ck / "step-00000001", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and re.search(
        rf"resume with: .* --resume {re.escape(str(out))} --no-compile$", err.strip().splitlines()[-1]
    )
    stopped = int(sorted(ck.glob("step-*"))[-1].name[5:])
    assert 1 <= stopped < 8 and not out.exists()
    # resumed, then SIGKILLed after its next checkpoint: no chance to clean up
    p = popen_example(SCRIPT, "--resume", out, "--no-compile")
    wait_for(ck / f"step-{stopped + 1:08d}", p)
    p.kill()
    p.communicate()
    newest = sorted(ck.glob("step-*"))[-1]
    assert not out.exists() and int(newest.name[5:]) < 8
    # the newest checkpoint corrupted: the previous one is used, with a warning
    corrupt(newest / "tensors.safetensors")
    proc = run_script("--resume", out, "--no-compile", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping checkpoint {newest.name}" in proc.stderr and "checksum mismatch" in proc.stderr
    assert not ck.parent.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".")]
    assert_same_model(reference_run, out)  # bitwise: eager CPU steps are deterministic


@pytest.fixture(scope="module")
def stopped_run(archive, tiny_bert, tmp_path_factory) -> tuple[Path, Path]:
    """An unfinished run (stopped by SIGTERM) whose data archive the test may change: (out, data)."""
    d = tmp_path_factory.mktemp("stopped")
    data = d / "data.tar.gz"
    shutil.copy(archive, data)
    out = d / "run"
    p = popen_example(SCRIPT, "--data", data, "--weights", tiny_bert, *TINY, "--out", out)
    wait_for(d / ".run.partial" / "checkpoints" / "step-00000001", p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "stopped by SIGTERM" in err, err[-2000:]
    return out, data


def _files(d: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in d.rglob("*")}


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "2e-3"),
        ("--max-len", "64"),
        ("--train-size", "12"),
        ("--weights", "/elsewhere/bert"),
        ("--data", "/elsewhere/imdb.tar.gz"),
    ],
)
def test_resume_with_another_setting_names_it(stopped_run, flag, value):
    out, _ = stopped_run
    before = _files(out.with_name(".run.partial"))
    proc = run_script("--resume", str(out), flag, value, "--no-compile", timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --resume") and f"{flag} differs" in err, err
    assert _files(out.with_name(".run.partial")) == before and not out.exists()


def test_resume_with_changed_data_contents_names_it(stopped_run):
    out, data = stopped_run
    original = data.read_bytes()
    try:
        write_imdb_archive(data, n_per_class=13)
        proc = run_script("--resume", str(out), "--no-compile", timeout=300)
        assert proc.returncode == 2
    finally:
        data.write_bytes(original)
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: cannot resume") and "--data (contents) differs" in err[-1], err


def load_data(path, train_size, val_size, test_size, seed=0) -> dict:
    """The main job's split (examples/finetune_imdb.py, step 2) through the library's functions."""
    from fnlm.data import default_val_size, load_imdb_splits, subset, train_val_split

    splits = load_imdb_splits(path, ("train", "test"))
    pool = splits["train"]
    n_val = val_size if val_size is not None else default_val_size(train_size or len(pool))
    train_idx, val_idx = train_val_split(pool.labels, train_size, n_val, seed=seed)
    test = subset(splits["test"], test_size, seed=seed) if test_size else splits["test"]
    return {"train": pool.select(train_idx), "val": pool.select(val_idx), "test": test}


def check_validation_split(path, train_size, val_size, test_size) -> dict:
    from fnlm.data import default_val_size

    data = load_data(path, train_size, val_size, test_size)
    train, val, test = data["train"], data["val"], data["test"]
    key = lambda d: set(zip(d.ids, d.labels))  # noqa: E731  (a review's identity within its split)
    assert val.split == train.split == "train" and test.split == "test"
    assert not key(train) & key(val), "validation reviews were trained on"
    n_val = val_size if val_size is not None else default_val_size(train_size or len(train) + len(val))
    assert len(val) == n_val and val.counts() == {0: n_val // 2, 1: n_val // 2}
    if train_size:  # the same training subset as before validation existed
        assert len(train) == train_size and train.counts() == {0: train_size // 2, 1: train_size // 2}
    return data


def test_validation_slice_is_balanced_and_disjoint(archive):
    from fnlm.data import load_imdb, subset

    for train_size, val_size in ((16, 4), (0, None), (10, 6), (0, 8)):
        data = check_validation_split(archive, train_size, val_size, 8)
        if train_size:
            assert data["train"].texts == subset(load_imdb(archive, "train"), train_size, seed=0).texts
        else:
            assert len(data["train"]) + len(data["val"]) == 24
    with pytest.raises(ValueError, match="--val-size 10: only 8 examples are left"):
        load_data(archive, 16, 10, 8)


@pytest.mark.slow
def test_validation_slice_on_real_reviews(imdb_archive):
    """The default subset of the real archive: no validation review's text is a test review's."""
    data = check_validation_split(imdb_archive, 2000, None, 1000)
    assert len(data["val"]) == 200 and not set(data["val"].texts) & set(data["test"].texts)


def test_keep_best_saves_the_best_validation_evaluation(reference_run, archive):
    metrics = json.loads((reference_run / "metrics.json").read_text())
    evals = metrics["evals"]
    assert [e["step"] for e in evals] == list(range(1, 9))
    best = min(evals, key=lambda e: (e["val_loss"], -e["val_accuracy"]))
    assert metrics["kept"] == {"which": "best", "step": best["step"], "val_accuracy": best["val_accuracy"]}
    # the saved parameters give the logged validation loss of that evaluation (and not the last one's)
    from fnlm.metrics import loss_and_accuracy

    data = load_data(archive, 16, 4, 8)
    probs = torch.softmax(fnlm_logits(reference_run, data["val"].texts, 32), -1)
    loss, acc = loss_and_accuracy(probs, torch.tensor(data["val"].labels))
    assert loss == pytest.approx(best["val_loss"], abs=1e-5) and acc == best["val_accuracy"]
    assert best["step"] != evals[-1]["step"] and abs(loss - evals[-1]["val_loss"]) > 1e-4, (
        "this configuration must have its best evaluation before the last step, else the test proves nothing"
    )


def test_classification_metrics_equal_sklearn(reference_run, archive):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from fnlm.metrics import classification_report

    g = torch.Generator().manual_seed(0)
    for y_true, y_pred in [
        (torch.randint(0, 2, (200,), generator=g).tolist(), torch.randint(0, 2, (200,), generator=g).tolist()),
        ([0, 0, 1, 1], [1, 1, 1, 1]),
    ]:  # no prediction of label 0: precision 0 (sklearn's zero_division=0)
        report = classification_report(y_true, y_pred, ("neg", "pos"))
        assert report["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1], zero_division=0)
        for k, name in enumerate(("neg", "pos")):
            got = report["per_class"][name]
            assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
                (p[k], r[k], f[k], s[k])
            )
    # the run's metrics.json, on the predictions of the saved model
    metrics = json.loads((reference_run / "metrics.json").read_text())
    test = load_data(archive, 16, 4, 8)["test"]
    y_pred = fnlm_logits(reference_run, test.texts, 32).argmax(-1).tolist()
    assert metrics["confusion_matrix"] == confusion_matrix(test.labels, y_pred, labels=[0, 1]).tolist()
    p, r, f, s = precision_recall_fscore_support(test.labels, y_pred, labels=[0, 1], zero_division=0)
    assert [metrics["per_class"][n]["f1"] for n in ("neg", "pos")] == pytest.approx(f.tolist())


def test_confidence_interval_and_errors_file(tmp_path):
    from scipy.stats import binomtest

    from fnlm.data import html_clean
    from fnlm.metrics import wilson_interval
    from fnlm.train import write_errors

    for k, n in ((869, 1000), (8, 8), (0, 5), (23013, 25000)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-6)
    test = Namespace(
        texts=["great<br />film", "awful\tstuff " * 40, "fine", "meh"], labels=[0, 1, 1, 0], ids=[10, 11, 12, 13]
    )
    probs = torch.tensor([[0.2, 0.8], [0.95, 0.05], [0.1, 0.9], [0.4, 0.6]])
    texts = [html_clean(t) for t in test.texts]
    assert write_errors(tmp_path / "e.tsv", probs, test.labels, texts, test.ids, ("neg", "pos"), chars=30) == 3
    rows = [r.split("\t") for r in (tmp_path / "e.tsv").read_text().splitlines()]
    assert rows[0] == ["probability", "predicted", "label", "id", "text"]
    assert [(r[0], r[1], r[2], r[3]) for r in rows[1:]] == [
        ("0.9500", "neg", "pos", "11"),
        ("0.8000", "pos", "neg", "10"),
        ("0.6000", "pos", "neg", "13"),
    ]
    assert rows[1][4] == "awful stuff awful stuff awful " and rows[2][4] == "great film"


HELLO = ROOT / "examples" / "hello_fnlm.py"
HELLO_TINY = ("--save-every", 4, "--no-compile", "--min-accuracy", 0, "--batch-size", 16)


def run_hello(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, str(HELLO), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_hello_resumed_from_an_earlier_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    """hello_fnlm.py through fnlm.train.Run: a 4-step run resumed from its step-4 checkpoint with
    --steps 12 (Adam's constant rate: --steps only says where to stop) ends with bitwise the train
    state of an uninterrupted 12-step run; a lower --steps or another --lr is refused, naming it."""
    ref = run_hello("--steps", 12, *HELLO_TINY, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    first = run_hello("--steps", 4, *HELLO_TINY, "--out", tmp_path / "run")
    assert first.returncode == 0, first.stderr
    for argv, msg in ((("--steps", 2), "--steps can only be raised"), (("--steps", 12, "--lr", 1e-3), "--lr differs")):
        bad = run_hello("--resume", tmp_path / "run", *argv, "--no-compile")
        assert bad.returncode == 2 and bad.stderr.startswith("error:") and msg in bad.stderr, bad.stderr
    res = run_hello("--resume", tmp_path / "run", "--steps", 12, "--no-compile")
    assert res.returncode == 0 and "resumed from" in res.stdout and "at step 4" in res.stdout, res.stderr
    a, b = (tmp_path / d / "checkpoints" / "step-00000012" / "tensors.safetensors" for d in ("ref", "run"))
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    held_out = [ln for ln in ref.stdout.splitlines() if ln.startswith("held-out")]
    assert held_out and held_out == [ln for ln in res.stdout.splitlines() if ln.startswith("held-out")]
    assert [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 13)
    )


@pytest.mark.parametrize(
    "argv, flag",
    [
        (("--lr", "-1e-4"), "--lr"),
        (("--steps", "0"), "--steps"),
        (("--min-accuracy", "2"), "--min-accuracy"),
        (("--steps", "x"), "--steps"),
    ],
)
def test_hello_bad_input_is_one_line_and_leaves_nothing(argv, flag, tmp_path):
    p = run_hello(*argv, "--out", tmp_path / "runs" / "hello")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], p.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_hello_config_file_plus_a_flag_is_what_print_config_shows_and_the_run_stores(tmp_path):
    cfg_file = tmp_path / "hello.json"
    cfg_file.write_text(json.dumps({"steps": 2, "batch_size": 8, "compile": False, "min_accuracy": 0, "lr": 0.01}))
    out = tmp_path / "hello"
    shown = run_hello("--config", cfg_file, "--seed", 3, "--out", out, "--print-config")
    assert shown.returncode == 0 and not out.exists(), shown.stderr
    shown = json.loads(shown.stdout)
    assert shown["seed"] == 3 and shown["lr"] == 0.01 and shown["steps"] == 2
    p = run_hello("--config", cfg_file, "--seed", 3, "--out", out)
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "run_config.json").read_text()) == shown


@pytest.mark.slow
def test_compiled_deterministic_run_killed_and_resumed_is_bitwise_the_same(archive, tiny_bert, tmp_path):
    """The compiled steps (train and eval) with --deterministic: SIGKILL after a checkpoint, --resume,
    and the saved model and metrics are bitwise those of the uninterrupted run."""
    args = [a for a in TINY if a != "--no-compile"] + ["--deterministic"]
    ref = run_script("--data", archive, "--weights", tiny_bert, *args, "--out", tmp_path / "ref", timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out, ck = tmp_path / "run", tmp_path / ".run.partial" / "checkpoints"
    p = popen_example(SCRIPT, "--data", archive, "--weights", tiny_bert, *args, "--out", out)
    wait_for(ck / "step-00000003", p, timeout=900)
    p.kill()
    p.communicate()
    proc = run_script("--resume", out, "--deterministic", timeout=900)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    assert_same_model(tmp_path / "ref", out)
