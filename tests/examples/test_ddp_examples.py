"""The main job on N workers: ``torchrun --nproc_per_node=2 examples/finetune_imdb.py`` (and
``pretrain_gpt.py``, ``pretrain_mlm.py``) on two gloo CPU processes, run as a user runs them, against the
single-process run with the same global batch.

What "the same" means here: the two runs compute the same global-batch loss and gradient in exact
arithmetic; in float32 the workers' partial sums and the all-reduce add in another order, so the final
parameters agree within float rounding, not bitwise: the tests allow 1e-6 absolute (measured here: at
most 1.4e-7 after 4-80 AdamW steps), the attention key bias aside (see ``key_bias``). Evaluations are
split by whole batches and gathered, so validation and test figures are computed on the very same
batches: compared exactly where they depend only on the model's argmax (accuracies) and within rounding
where they are the model's floats. The BERT here has dropout 0: with dropout every worker draws its own
masks (``fold_in(key, rank)``), which are not the single process's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    EXAMPLES,
    GPT_TINY,
    ROOT,
    SCRIPT,
    example_env,
    popen_example,
    run_example,
    wait_for,
    write_imdb_archive,
)
from safetensors.torch import load_file

GPT = EXAMPLES / "pretrain_gpt.py"
# 22 training reviews (2 of the 24 validate) in batches of 4: the last batch holds 2 real rows and 2 padding
# rows (weight 0), so worker 1 of 2 gets a shard that weighs nothing (the scaled loss must still be exact)
FT = [
    "--train-size",
    "0",
    "--test-size",
    "0",
    "--max-len",
    "32",
    "--batch-size",
    "4",
    "--epochs",
    "3",
    "--eval-every",
    "0",
    "--save-every",
    "1",
    "--buckets",
    "1",
    "--no-compile",
]
ATOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(script: Path, *args, n: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        f"--master_port={free_port()}",
        str(script),
        *map(str, args),
    ]


def torchrun(script: Path, *args, n: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_cmd(script, *args, n=n),
        cwd=ROOT,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def popen_torchrun(script: Path, *args, n: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        torchrun_cmd(script, *args, n=n),
        cwd=ROOT,
        env=example_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def key_bias(name: str, x: torch.Tensor) -> slice | None:
    """The attention key bias inside a saved tensor (BERT's ``attention.self.key.bias``, the middle third
    of GPT-2's fused ``attn.c_attn.bias``), else None. Its gradient is exactly 0 in exact arithmetic
    (softmax ignores a constant added to all of a query's scores), so AdamW turns float rounding noise
    into steps of about the learning rate: those elements differ between any two summation orders,
    data parallel or not, and are left out of the comparison."""
    if name.endswith("attention.self.key.bias"):
        return slice(None)
    if name.endswith("attn.c_attn.bias"):
        d = x.shape[0] // 3
        return slice(d, 2 * d)
    return None


def assert_same_model(a: Path, b: Path, atol: float = ATOL) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        x, y = ta[k].clone(), tb[k].clone()
        if (kb := key_bias(k, x)) is not None:
            x[kb] = y[kb] = 0.0
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def assert_same_finetune(a: Path, b: Path) -> None:
    """The same model (within rounding), the same per-step losses, evaluations and test results."""
    assert_same_model(a, b)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["steps"] == mb["steps"]
    torch.testing.assert_close(
        torch.tensor(ma["train_loss_per_step"]), torch.tensor(mb["train_loss_per_step"]), atol=1e-5, rtol=0
    )
    assert [e["val_accuracy"] for e in ma["evals"]] == [e["val_accuracy"] for e in mb["evals"]]
    assert ma["final_test_accuracy"] == mb["final_test_accuracy"]
    assert ma["confusion_matrix"] == mb["confusion_matrix"]
    assert ma["test_loss"] == pytest.approx(mb["test_loss"], abs=1e-5)
    lines = [json.loads(ln) for ln in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, mb["steps"] + 1))  # one log, rank 0's


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_imdb_archive(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz")


@pytest.fixture(scope="module")
def bert(tiny_bert, tmp_path_factory) -> Path:
    """The 2-layer random BERT with dropout 0 (see the module docstring)."""
    d = tmp_path_factory.mktemp("bert") / "bert"
    shutil.copytree(tiny_bert, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def one_worker(archive, bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    p = run_example(SCRIPT, "--data", archive, "--weights", bert, "--out", out, *FT)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_two_workers_equal_one(archive, bert, one_worker, tmp_path):
    out = tmp_path / "run"
    t = time.time()
    p = torchrun(SCRIPT, "--data", archive, "--weights", bert, "--out", out, *FT)
    assert p.returncode == 0, p.stderr[-3000:]
    print(f"2 workers: {time.time() - t:.0f}s")
    assert p.stdout.count("test accuracy") == 1  # one log: rank 0's
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]  # nothing else written, nothing left over
    assert_same_finetune(one_worker, out)


def test_two_workers_with_grad_accum_equal_one(archive, bert, tmp_path):
    """--grad-accum 3 --batch-size 2: each worker takes its row of every micro-batch; the last update's
    micro-batches hold 2, 2 and 0 real reviews, so some workers' shards weigh nothing."""
    args = [a for a in FT if a not in ("--epochs", "3")] + ["--batch-size", "2", "--grad-accum", "3", "--epochs", "1"]
    p = run_example(SCRIPT, "--data", archive, "--weights", bert, "--out", tmp_path / "one", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(SCRIPT, "--data", archive, "--weights", bert, "--out", tmp_path / "two", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_finetune(tmp_path / "one", tmp_path / "two")


def stop_with_sigint(proc: subprocess.Popen, checkpoints: Path) -> str:
    wait_for(checkpoints / "step-00000002", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-2000:]
    steps = sorted(checkpoints.glob("step-*"))
    assert steps and 2 <= int(steps[-1].name[5:]) < 18, err[-2000:]
    return err


def test_two_workers_stopped_then_resumed_on_one(archive, bert, one_worker, tmp_path):
    """SIGINT to the torchrun launcher: it forwards it to both workers, they agree on the step, rank 0
    writes one checkpoint and the resume command; one process then finishes the run."""
    out, ck = tmp_path / "run", tmp_path / ".run.partial" / "checkpoints"
    err = stop_with_sigint(popen_torchrun(SCRIPT, "--data", archive, "--weights", bert, "--out", out, *FT), ck)
    assert f"resume with: torchrun --nproc_per_node=2 {SCRIPT} --resume {out}" in err, err[-2000:]
    assert err.count("resume with:") == 1 and "Error waiting" not in err
    res = run_example(SCRIPT, "--resume", out, "--no-compile")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert_same_finetune(one_worker, out)


def test_one_worker_stopped_then_resumed_on_two(archive, bert, one_worker, tmp_path):
    out, ck = tmp_path / "run", tmp_path / ".run.partial" / "checkpoints"
    err = stop_with_sigint(popen_example(SCRIPT, "--data", archive, "--weights", bert, "--out", out, *FT), ck)
    assert err.strip().splitlines()[-1].endswith(f"--resume {out} --no-compile")
    res = torchrun(SCRIPT, "--resume", out, "--no-compile")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert not ck.parent.exists()
    assert_same_finetune(one_worker, out)


@pytest.mark.parametrize("script", [SCRIPT, GPT], ids=["finetune_imdb", "pretrain_gpt"])
def test_batch_size_not_divisible_is_one_line_before_loading(script, tmp_path):
    out = tmp_path / "run"
    p = torchrun(script, "--data", tmp_path / "missing.tar.gz", "--batch-size", "5", "--out", out, "--no-compile")
    assert p.returncode != 0
    ours = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    line = (
        "error: --batch-size 5 must be divisible by the number of workers (2): each worker takes an equal "
        "share of every batch"
    )
    assert ours == [line], p.stderr[-3000:]
    assert "missing.tar.gz" not in p.stderr  # before the data is looked at
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def gpt_archive(tmp_path_factory) -> Path:
    """300 training reviews of word salad (the pretrain_gpt tests' kind of data)."""
    import tarfile

    words = (
        "film movie plot actor scene great bad boring funny story music ending character director "  # noqa: SIM905
        "camera love hate watch again never best worst script twist cast"
    ).split()
    base = tmp_path_factory.mktemp("gpt_imdb")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 150), ("test", 10)):
        for sent, rating in (("pos", 8), ("neg", 2)):
            d = base / "aclImdb" / split / sent
            d.mkdir(parents=True)
            for i in range(n):
                idx = torch.randint(0, len(words), (12,), generator=g).tolist()
                (d / f"{i}_{rating}.txt").write_text(" ".join(words[j] for j in idx) + ".")
    path = base / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(base / "aclImdb", arcname="aclImdb")
    shutil.rmtree(base / "aclImdb")
    return path


def assert_same_gpt(a: Path, b: Path, atol: float = ATOL) -> None:
    assert_same_model(a / "model", b / "model", atol)
    assert (a / "tokenizer" / "tokenizer.json").read_text() == (b / "tokenizer" / "tokenizer.json").read_text()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in ma["history"]]),
        torch.tensor([h["loss"] for h in mb["history"]]),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        torch.tensor([e["val_loss"] for e in ma["evals"]]),
        torch.tensor([e["val_loss"] for e in mb["evals"]]),
        atol=1e-5,
        rtol=0,
    )


@pytest.fixture(scope="module")
def gpt_one(gpt_archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt_one") / "gpt"
    p = run_example(GPT, "--data", gpt_archive, "--out", out, *GPT_TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_pretrain_gpt_two_workers_equal_one(gpt_archive, gpt_one, tmp_path):
    p = torchrun(GPT, "--data", gpt_archive, "--out", tmp_path / "gpt", *GPT_TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["gpt"]
    assert_same_gpt(gpt_one, tmp_path / "gpt")


def test_pretrain_gpt_stopped_on_two_resumed_on_one(gpt_archive, gpt_one, tmp_path):
    out = tmp_path / "gpt"
    p = torchrun(GPT, "--data", gpt_archive, "--out", out, "--stop-after", "6", *GPT_TINY)
    assert p.returncode == 0 and p.stderr.count("resume with:") == 1, p.stderr[-3000:]
    p = run_example(GPT, "--resume", out, "--no-compile")
    assert p.returncode == 0 and "resumed from step" not in p.stdout and "resumed from" in p.stdout, p.stderr[-3000:]
    assert_same_gpt(gpt_one, out)


LONGER = [a if a != "10" else "40" for a in GPT_TINY]


def test_pretrain_gpt_dead_worker_is_one_line_then_resume_on_one(gpt_archive, tmp_path):
    """SIGKILL to worker 1 mid-run: worker 0 exits with one fnlm line (no hang, no traceback of ours);
    the run then resumes on one process from rank 0's last checkpoint and ends as the uninterrupted run.
    The one-process runs go through ``torchrun --nproc_per_node=1`` (no process group: the plain script)
    for its one thread per process: 80 tiny steps with the default threads took 59 s on the loaded
    2-core machine, 18 s with one."""
    ref, out, ck = tmp_path / "ref", tmp_path / "gpt", tmp_path / ".gpt.partial" / "checkpoints"
    p = torchrun(GPT, "--data", gpt_archive, "--out", ref, *LONGER, n=1)  # one process (torchrun: 1 thread)
    assert p.returncode == 0, p.stderr[-3000:]
    proc = popen_torchrun(GPT, "--data", gpt_archive, "--out", out, *LONGER)
    wait_for(ck / "step-00000004", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False).stdout.split()
    assert len(workers) == 2
    t = time.time()
    os.kill(int(workers[1]), signal.SIGKILL)  # the launcher starts rank 0 first
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t < 60 and not out.exists()
    ours = [ln for ln in err.splitlines() if ln.startswith("fnlm: worker")]
    assert len(ours) == 1 and ours[0].startswith("fnlm: worker 0 of 2: stopped at a collective"), err[-3000:]
    assert 'examples/pretrain_gpt.py", line' not in err  # no traceback from the script
    res = torchrun(GPT, "--resume", out, "--no-compile", n=1)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert_same_gpt(ref, out)


@pytest.mark.slow
def test_compiled_two_workers_equal_one(archive, bert, gpt_archive, tmp_path):
    """The compiled steps (the all-reduce inside the graph): 2 workers == 1 worker, both scripts."""
    ft = [a for a in FT if a != "--no-compile"] + ["--epochs", "1"]
    runs = {}
    for name, n in (("one", 1), ("two", 2)):
        out = tmp_path / f"ft-{name}"
        p = torchrun(SCRIPT, "--data", archive, "--weights", bert, "--out", out, *ft, n=n)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = out
    assert_same_finetune(runs["one"], runs["two"])
    gpt = [a for a in GPT_TINY if a != "--no-compile"]
    for name, n in (("one", 1), ("two", 2)):
        out = tmp_path / f"gpt-{name}"
        p = torchrun(GPT, "--data", gpt_archive, "--out", out, *gpt, n=n)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = out
    assert_same_gpt(runs["one"], runs["two"], atol=1e-5)


MLM = EXAMPLES / "pretrain_mlm.py"
# 40 training reviews, 8 held out (2 evaluation batches, one per worker), 8 batches of 4 per epoch
MLM_TINY = [
    "--steps",
    "12",
    "--batch-size",
    "4",
    "--max-len",
    "32",
    "--eval-every",
    "4",
    "--eval-size",
    "8",
    "--save-every",
    "2",
    "--whole-word",
    "--lr",
    "1e-3",
    "--no-compile",
]


@pytest.fixture(scope="module")
def mlm_archive(tmp_path_factory) -> Path:
    return write_imdb_archive(tmp_path_factory.mktemp("mlm_imdb") / "aclImdb_v1.tar.gz", n_per_class=20)


def assert_same_mlm(a: Path, b: Path) -> None:
    """The same model (within rounding), per-step losses and held-out evaluations (MLM, and NSP if any)."""
    assert_same_model(a, b)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    torch.testing.assert_close(
        torch.tensor(ma["train_loss_per_step"]), torch.tensor(mb["train_loss_per_step"]), atol=1e-5, rtol=0
    )
    assert len(ma["history"]) == len(mb["history"]) == 4
    for ea, eb in zip(ma["history"], mb["history"]):
        assert ea.keys() == eb.keys()
        for k in ea:
            if k.endswith("_loss"):
                assert ea[k] == pytest.approx(eb[k], abs=1e-5), k
            else:  # step, masked tokens, pairs, accuracies (the argmax of the same batches)
                assert ea[k] == eb[k], k
    lines = [json.loads(ln) for ln in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 13))  # one log, rank 0's


def mlm_run(archive: Path, bert: Path, out: Path, *extra, n: int) -> Path:
    """A pretrain_mlm.py run on ``n`` workers (``n = 1``: torchrun starts the plain script, no group, one
    thread: the loaded 2-core machine runs it faster than with the default threads)."""
    p = torchrun(MLM, "--data", archive, "--weights", bert, "--out", out, *MLM_TINY, *extra, n=n)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def mlm_one(mlm_archive, bert, tmp_path_factory) -> Path:
    return mlm_run(mlm_archive, bert, tmp_path_factory.mktemp("mlm_one") / "mlm", n=1)


def test_pretrain_mlm_two_workers_equal_one(mlm_archive, bert, mlm_one, tmp_path):
    """Each worker's MLM loss is a mean over its own masked tokens, weighted by its share of the batch's."""
    mlm_run(mlm_archive, bert, tmp_path / "mlm", n=2)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mlm"]
    assert_same_mlm(mlm_one, tmp_path / "mlm")


def test_pretrain_mlm_nsp_two_workers_equal_one(mlm_archive, bert, tmp_path):
    """--nsp: the MLM term weighted by masked tokens, the NSP term by sentence pairs (rows that pad a batch
    have none), each separately."""
    one = mlm_run(mlm_archive, bert, tmp_path / "one", "--nsp", n=1)
    two = mlm_run(mlm_archive, bert, tmp_path / "two", "--nsp", n=2)
    assert json.loads((two / "metrics.json").read_text())["history"][-1]["pairs"] > 0
    assert_same_mlm(one, two)


def test_pretrain_mlm_stopped_on_two_resumed_on_one(mlm_archive, bert, mlm_one, tmp_path):
    """SIGINT to torchrun: both workers stop at the same step, rank 0 writes one checkpoint and the resume
    command; one process then finishes the run as the uninterrupted one."""
    out, ck = tmp_path / "mlm", tmp_path / ".mlm.partial" / "checkpoints"
    proc = popen_torchrun(MLM, "--data", mlm_archive, "--weights", bert, "--out", out, *MLM_TINY)
    wait_for(ck / "step-00000002", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-2000:]
    steps = sorted(ck.glob("step-*"))
    assert steps and 2 <= int(steps[-1].name[5:]) < 12, err[-2000:]
    assert f"resume with: torchrun --nproc_per_node=2 {MLM} --resume {out}" in err, err[-2000:]
    assert err.count("resume with:") == 1 and "Error waiting" not in err
    res = torchrun(MLM, "--resume", out, "--no-compile", n=1)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert not ck.parent.exists()
    assert_same_mlm(mlm_one, out)
