"""Continued (domain-adaptive) masked-language-model pretraining of a BERT on IMDb reviews, and fill-mask.

BERT's own objective on in-domain text before fine-tuning (Gururangan et al. 2020, "Don't Stop
Pretraining"): every step masks a fresh 15% of the tokens from that step's random key (80%
[MASK], 10% random token, 10% unchanged; ``--whole-word`` masks all pieces of a word together),
and the model predicts them. Only the training split's text is used (plus ``aclImdb/train/unsup``
when the archive has it), never the test split's: the test reviews stay unseen for the
fine-tuning run that follows. A held-out slice of the training reviews gives MLM loss and
accuracy at intervals. The output directory is a Hugging Face ``BertForMaskedLM`` checkpoint (it
keeps the source's pooler), which ``examples/finetune_imdb.py --weights DIR`` fine-tunes.

    python examples/pretrain_mlm.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --out runs/mlm
    python examples/finetune_imdb.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --weights runs/mlm

    # fill-mask with the result (or any BERT with an MLM head)
    python examples/pretrain_mlm.py --model runs/mlm --predict "the film was [MASK] ."

    # BERT's full pretraining objective: MLM + next-sentence prediction on sentence pairs
    python examples/pretrain_mlm.py --data ../shared/data/aclImdb_v1_labelled.tar.gz --nsp --out runs/nsp

``--nsp`` trains on IsNext/NotNext pairs of training-review sentences (:func:`fnlm.data.nsp_pairs`,
half of the B segments from another review), with ``pretraining_loss`` (MLM + NSP); it reports
both losses and the NSP accuracy on pairs built from the held-out training reviews, and writes a
``BertForPreTraining`` directory (pooler and NSP head included; a source without an NSP head
starts from a fresh one).

all-MiniLM-L6-v2 (the default ``--weights``) was distilled without an MLM head: the run then
starts from a freshly initialised head tied to the word embeddings, and says so.
"""
from __future__ import annotations

import argparse
import re
import sys
import tarfile
import time
from pathlib import Path

import torch

import fnlm
from fnlm import optim, random
from fnlm.data import (DatasetError, DownloadError, bucket_lengths, download_imdb, html_clean, load_imdb_splits,
                       load_tokenizer, make_batches)
from fnlm.io import CheckpointError, atomic_dir, ensure_minilm, write_json
from fnlm.data import nsp_pairs
from fnlm.models import bert_mlm, init_nsp_head, load_bert, mask_tokens, mlm_loss, pretraining_loss, save_bert
from fnlm.train import make_eval_step, make_train_step
from fnlm.tree import num_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "weights" / "all-MiniLM-L6-v2"
TEXT_SPLITS = ("train", "unsup")  # the only IMDb text pretraining may read


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("data and model")
    g.add_argument("--data", type=Path, help="IMDb archive or folder (default: download into ~/.cache/fnlm)")
    g.add_argument("--splits", default="train,unsup",
                   help="IMDb text to pretrain on: train and/or unsup (unsup is used when the archive has it); "
                   "the test split is refused")
    g.add_argument("--train-size", type=int, default=0, help="use only this many reviews (0 = all)")
    g.add_argument("--eval-size", type=int, default=200, help="training reviews held out for the MLM evaluation")
    g.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="the BERT checkpoint to continue from")
    g.add_argument("--max-len", type=int, default=128, help="word pieces per review ([CLS], [SEP] included)")
    g = ap.add_argument_group("training")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, linear warm-up and decay)")
    g.add_argument("--warmup", type=float, default=0.06, help="warm-up, as a fraction of --steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--mask-prob", type=float, default=0.15)
    g.add_argument("--whole-word", action="store_true", help="mask all word pieces of a word together")
    g.add_argument("--nsp", action="store_true",
                   help="also train next-sentence prediction on sentence pairs (MLM + NSP, BertForPreTraining output)")
    g.add_argument("--eval-every", type=int, default=100, help="held-out MLM loss / accuracy every N steps")
    g.add_argument("--seed", type=int, default=0, help="head init, data order, masks and dropout derive from it")
    g.add_argument("--no-compile", action="store_true", help="run the steps eagerly")
    g.add_argument("--out", type=Path, help="output directory (default runs/mlm-<timestamp>)")
    g.add_argument("--overwrite", action="store_true")
    g = ap.add_argument_group("fill-mask")
    g.add_argument("--predict", nargs="+", metavar="TEXT", help='print the top-k fillers of each [MASK] and exit')
    g.add_argument("--model", type=Path, help="an MLM checkpoint directory for --predict (default --weights)")
    g.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "max_len", "eval_every", "top_k"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_size < 0 or args.eval_size < 0:
        ap.error("--train-size and --eval-size must be >= 0")
    if not 0.0 < args.mask_prob < 1.0:
        ap.error(f"--mask-prob must be in (0, 1), got {args.mask_prob}")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in TEXT_SPLITS + ("test",)]  # test: refused in load_texts, one line
    if bad or not splits:
        ap.error(f"--splits must name train and/or unsup, got {args.splits!r}")
    args.splits = splits
    return args


# ----------------------------------------------------------------------------- data
def read_unsup(path: Path) -> list[str] | None:
    """The unlabelled reviews ``aclImdb/train/unsup/*.txt`` of an archive or folder (None if absent)."""
    member = re.compile(r"(?:^|/)aclImdb/train/unsup/\d+_\d+\.txt$")
    texts = []
    if path.is_dir():
        for f in sorted(path.glob("**/aclImdb/train/unsup/*.txt")):
            texts.append(f.read_text(encoding="utf-8"))
    else:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and member.search(m.name):
                    texts.append(tar.extractfile(m).read().decode("utf-8"))
    return texts or None


def load_texts(args) -> list[str]:
    """Training-split review texts (+ unsup if asked and present); never the test split."""
    path = args.data if args.data is not None else download_imdb()
    texts: list[str] = []
    if "train" in args.splits:
        texts += load_imdb_splits(path, ("train",))["train"].texts
    if "unsup" in args.splits:
        unsup = read_unsup(Path(path))
        if unsup is None:
            print(f"note: {path} has no aclImdb/train/unsup reviews; pretraining on the train split only", flush=True)
        else:
            texts += unsup
    if not texts:
        raise CliError(f"{path}: no training text found for --splits {','.join(args.splits)}")
    return [html_clean(t) for t in texts]


def load_model(path: Path, key):
    """``(params, pooler, cfg, tokenizer, fresh_head)``: an MLM model, the source's pooler kept aside
    (None if it has none) so the output can still be fine-tuned as a classifier."""
    if path == DEFAULT_WEIGHTS and not (path / "config.json").is_file():
        ensure_minilm(path)
    if not (path / "config.json").is_file():
        raise CliError(f"{path}: no config.json, so not a Hugging Face checkpoint directory")

    def attempt(pooler: bool):  # -> ((params, cfg), fresh head?)
        try:
            return load_bert(path, head="mlm", pooler=pooler), False
        except CheckpointError as e:
            if "no mlm head" not in str(e):
                raise
        return load_bert(path, head="mlm", pooler=pooler, head_key=key), True

    try:
        try:
            (params, cfg), fresh = attempt(True)
        except CheckpointError as e:
            if "pooler" not in str(e):
                raise
            (params, cfg), fresh = attempt(False)
        tokenizer = load_tokenizer(path)
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        raise CliError(str(e).splitlines()[0] + (" ..." if len(str(e).splitlines()) > 1 else "")) from None
    if tokenizer.mask_id is None:
        raise CliError(f"{path}: the tokenizer has no [MASK] token")
    pooler = params["bert"].pop("pooler", None)
    return params, pooler, cfg, tokenizer, fresh


# ----------------------------------------------------------------------------- masking
def masked(batch: dict, key, tokenizer, vocab_size: int, args) -> dict:
    """The batch with a fresh BERT mask drawn from ``key`` (dynamic masking): ``input_ids`` masked,
    ``labels`` the original ids at the selected positions, -100 elsewhere."""
    special = [tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id]
    starts = tokenizer.word_starts(batch["input_ids"]) if args.whole_word else None
    ids, labels = mask_tokens(key, batch["input_ids"], batch["attention_mask"], tokenizer.mask_id, vocab_size,
                              special, prob=args.mask_prob, word_starts=starts)
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "token_type_ids": batch["token_type_ids"],
            "labels": labels}


# ----------------------------------------------------------------------------- next-sentence prediction
def load_nsp_head(path: Path, cfg, key):
    """``(nsp params, fresh?)``: the checkpoint's ``cls.seq_relationship`` if it has one, else a new head."""
    try:
        return load_bert(path, head="pretraining", strict=False)[0]["nsp"], False
    except CheckpointError:
        return init_nsp_head(key, cfg), True


def nsp_masked(b: dict, pairs, key, tokenizer, vocab_size: int, args) -> dict:
    """A ``make_batches`` batch of NSP pairs, masked as :func:`masked`, with its token types (B = 1)
    and ``next_sentence_label`` (0 IsNext, 1 NotNext, -100 on dummy rows)."""
    nsp_label = torch.where(b["weight"] > 0, b["labels"], torch.full_like(b["labels"], -100))
    b = {**b, "token_type_ids": pairs.token_type_ids(b["index"], b["attention_mask"])}
    return {**masked(b, key, tokenizer, vocab_size, args), "next_sentence_label": nsp_label}


# ----------------------------------------------------------------------------- training
def train(args) -> int:
    t_start = time.time()
    if "test" in args.splits:
        raise CliError("--splits: refusing to pretrain on the IMDb test split's text (it is the held-out "
                       "evaluation set of the fine-tuning that follows); use train and/or unsup")
    out = args.out or Path("runs") / time.strftime("mlm-%Y%m%d-%H%M%S")
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} already exists (pass --overwrite to replace it, or choose another --out)")
    k_head, k_mask, k_drop, k_eval = random.split(random.key(args.seed), 4)
    params, pooler, cfg, tokenizer, fresh = load_model(args.weights, k_head)
    if args.max_len > cfg.max_position_embeddings:
        raise CliError(f"--max-len {args.max_len} is longer than the model's position table "
                       f"(max_position_embeddings={cfg.max_position_embeddings})")
    if fresh:
        print(f"note: {args.weights} has no MLM head (cls.predictions); training a freshly initialised one, "
              "tied to the word embeddings", flush=True)
    texts = load_texts(args)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_eval = min(args.eval_size, len(texts) // 5)
    eval_texts = [texts[i] for i in order[:n_eval]]
    train_texts = [texts[i] for i in order[n_eval:]]
    if args.train_size:
        train_texts = train_texts[: args.train_size]
    if args.nsp:  # sentence pairs of the training reviews; held-out pairs from the held-out reviews only
        if pooler is None:
            raise CliError(f"--nsp: {args.weights} has no pooler, which next-sentence prediction reads")
        params["bert"]["pooler"] = pooler
        params["nsp"], fresh_nsp = load_nsp_head(args.weights, cfg, random.fold_in(k_head, 1))
        if fresh_nsp:
            print(f"note: {args.weights} has no NSP head (cls.seq_relationship); training a fresh one", flush=True)
        pairs = nsp_pairs(tokenizer, train_texts, max_len=args.max_len, seed=args.seed)
        eval_pairs = nsp_pairs(tokenizer, eval_texts, max_len=args.max_len, seed=args.seed + 1) if n_eval >= 2 else None
        ids, eval_ids = pairs.input_ids, eval_pairs.input_ids if eval_pairs else []
        print(f"next-sentence prediction: {len(ids)} training pairs, {len(eval_ids)} held-out pairs "
              f"({sum(pairs.labels)} / {len(ids)} NotNext)", flush=True)
    else:
        ids = tokenizer.encode_ids(train_texts, max_len=args.max_len)
        eval_ids = tokenizer.encode_ids(eval_texts, max_len=args.max_len)
    buckets = bucket_lengths(args.max_len, 2)
    print(f"model {args.weights} ({num_params(params) / 1e6:.1f}M params), {len(ids)} training / {n_eval} "
          f"held-out reviews, {args.steps} steps of {args.batch_size}, masking "
          f"{'whole words' if args.whole_word else 'word pieces'} with p={args.mask_prob}", flush=True)

    V = cfg.vocab_size
    eval_batches = [masked(b, random.fold_in(k_eval, i), tokenizer, V, args) for i, b in enumerate(
        make_batches(eval_ids, None, args.batch_size, buckets, shuffle=False, pad_id=tokenizer.pad_id))]
    if args.nsp:
        eval_batches = [nsp_masked(b, eval_pairs, random.fold_in(k_eval, i), tokenizer, V, args) for i, b in enumerate(
            make_batches(eval_ids, eval_pairs.labels if eval_pairs else None, args.batch_size, buckets,
                         shuffle=False, pad_id=tokenizer.pad_id))]
    schedule = optim.linear_warmup_linear_decay(args.lr, round(args.warmup * args.steps), args.steps)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0),
                            optim.inject_hyperparams(optim.adamw)(lr=schedule, weight_decay=args.weight_decay))
    opt_state = optimizer.init(params)

    def loss_fn(p, batch, key):
        return (pretraining_loss if args.nsp else mlm_loss)(p, batch, cfg, key=key, train=True)

    def eval_fn(p, batch):
        if args.nsp:
            _, aux = pretraining_loss(p, batch, cfg)
            return aux["mlm_loss"], aux["mlm_accuracy"], aux["nsp_loss"], aux["nsp_accuracy"]
        loss, aux = mlm_loss(p, batch, cfg)
        return loss, aux["accuracy"]

    train_step = make_train_step(loss_fn, optimizer, compile=not args.no_compile)
    eval_step = make_eval_step(eval_fn, compile=not args.no_compile)

    def evaluate(p) -> dict:
        tot_loss = tot_acc = n = 0.0
        nsp_loss = nsp_acc = n_pairs = 0.0
        for b in eval_batches:
            k = float((b["labels"] != -100).sum())
            loss, acc, *nsp = eval_step(p, b)
            tot_loss, tot_acc, n = tot_loss + float(loss) * k, tot_acc + float(acc) * k, n + k
            if nsp:
                k = float((b["next_sentence_label"] != -100).sum())
                nsp_loss, nsp_acc, n_pairs = nsp_loss + float(nsp[0]) * k, nsp_acc + float(nsp[1]) * k, n_pairs + k
        out = {"mlm_loss": tot_loss / max(n, 1.0), "mlm_accuracy": tot_acc / max(n, 1.0), "masked_tokens": int(n)}
        if args.nsp:
            out |= {"nsp_loss": nsp_loss / max(n_pairs, 1.0), "nsp_accuracy": nsp_acc / max(n_pairs, 1.0),
                    "nsp_pairs": int(n_pairs)}
        return out

    def describe(h: dict) -> str:
        return (f"held-out MLM loss {h['mlm_loss']:.4f}, accuracy {h['mlm_accuracy']:.4f}"
                + (f"; NSP loss {h['nsp_loss']:.4f}, accuracy {h['nsp_accuracy']:.4f} on {h['nsp_pairs']} pairs"
                   if "nsp_loss" in h else ""))

    from tqdm.auto import tqdm

    history = [{"step": 0, **evaluate(params)}] if eval_batches else []
    if history:
        print(f"step 0: {describe(history[0])}", flush=True)
    losses, step, epoch = [], 0, 0
    t_train = time.time()
    bar = tqdm(total=args.steps, desc="pretraining", unit="step", dynamic_ncols=True, disable=None)
    while step < args.steps:
        epoch += 1
        for b in make_batches(ids, pairs.labels if args.nsp else None, args.batch_size, buckets, shuffle=True,
                              seed=args.seed, epoch=epoch, pad_id=tokenizer.pad_id,
                              drop_last=len(ids) >= args.batch_size):
            key = random.fold_in(k_mask, step)  # this step's own mask
            batch = nsp_masked(b, pairs, key, tokenizer, V, args) if args.nsp else masked(b, key, tokenizer, V, args)
            params, opt_state, m = train_step(params, opt_state, batch, random.fold_in(k_drop, step))
            step += 1
            losses.append(float(m["loss"]))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{float(m['lr']):.1e}")
            if eval_batches and (step % args.eval_every == 0 or step == args.steps):
                history.append({"step": step, **evaluate(params)})
                bar.write(f"step {step}: {describe(history[-1])}")
            if step == args.steps:
                break
    bar.close()
    train_s = time.time() - t_train

    metrics = {"history": history, "train_loss_per_step": losses, "train_seconds": train_s,
               "fresh_mlm_head": fresh, "source": str(args.weights), "texts": len(ids), "held_out": n_eval,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "fnlm": fnlm.__version__}
    if pooler is not None and not args.nsp:
        params["bert"]["pooler"] = pooler
    with atomic_dir(out) as tmp:
        save_bert(params, cfg, tmp, head="pretraining" if args.nsp else "mlm", tokenizer_dir=args.weights)
        write_json(metrics, tmp / "metrics.json")
    last = history[-1] if history else {}
    print(f"pretrained {step} steps in {train_s:.0f}s"
          + (f"; held-out MLM loss {history[0]['mlm_loss']:.4f} -> {last['mlm_loss']:.4f}, accuracy "
             f"{history[0]['mlm_accuracy']:.4f} -> {last['mlm_accuracy']:.4f}" if history else "")
          + (f"; held-out NSP loss {history[0]['nsp_loss']:.4f} -> {last['nsp_loss']:.4f}, accuracy "
             f"{history[0]['nsp_accuracy']:.4f} -> {last['nsp_accuracy']:.4f}" if history and args.nsp else "")
          + f"; wrote {out}/ ({'BertForPreTraining' if args.nsp else 'BertForMaskedLM'} layout) in "
            f"{time.time() - t_start:.0f}s")
    return 0


# ----------------------------------------------------------------------------- fill-mask
def fill_mask(params, cfg, tokenizer, text: str, top_k: int) -> list[list[tuple[str, float, str]]]:
    """For each [MASK] of ``text``: the ``top_k`` ``(token, probability, filled sequence)``, as the
    ``transformers`` ``fill-mask`` pipeline (softmax over the vocabulary at the masked position)."""
    b = tokenizer.encode([text], max_len=min(512, cfg.max_position_embeddings))
    ids = b["input_ids"][0]
    where = (ids == tokenizer.mask_id).nonzero().flatten().tolist()
    if not where:
        raise CliError(f"no [MASK] token in {text!r}: write the word to predict as [MASK]")
    with torch.no_grad():
        probs = torch.softmax(bert_mlm(params, b["input_ids"], cfg, attention_mask=b["attention_mask"],
                                       token_type_ids=b["token_type_ids"])[0].float(), -1)
    out = []
    for pos in where:
        top = probs[pos].topk(top_k)
        rows = []
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            filled = ids.clone()
            filled[pos] = i
            rows.append((tokenizer.id_to_token(i), p, tokenizer.decode(filled)))
        out.append(rows)
    return out


def predict(args) -> int:
    path = args.model or args.weights
    if not (path / "config.json").is_file():
        raise CliError(f"{path}: no config.json, so not a Hugging Face checkpoint directory")
    try:
        params, cfg = load_bert(path, head="mlm")
        tokenizer = load_tokenizer(path)
    except CheckpointError as e:
        first = str(e).splitlines()
        if "no mlm head" in str(e):
            raise CliError(f"{path}: no MLM head (cls.predictions) to fill masks with; pretrain it first "
                           "(python examples/pretrain_mlm.py --weights ...)") from None
        raise CliError(first[0]) from None
    for text in args.predict:
        for k, rows in enumerate(fill_mask(params, cfg, tokenizer, text, args.top_k)):
            print(f"{text}" + (f"  [MASK] #{k + 1}" if k else ""))
            for token, p, seq in rows:
                print(f"  {p:.4f}\t{token}\t{seq}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return predict(args) if args.predict else train(args)
    except (CliError, DatasetError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output directory was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
