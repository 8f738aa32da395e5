"""Byte-level BPE tokenizers (GPT-2, RoBERTa) from vocab.json/merges.txt or tokenizer.json: the
same ids as transformers' tokenizers; load_gpt2 + the tokenizer + generate reproduce
transformers' greedy continuation on a random-weight GPT-2 saved with its tokenizer."""

import shutil

import pytest
import torch
from helpers import byte_level_bpe

transformers = pytest.importorskip("transformers")

from fnlm.data import BPETokenizer, load_tokenizer
from fnlm.models import generate, load_gpt2

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A movie review: this film was great, truly great!",
    "Generation with a cache reproduces the slow path.",
    "Hello world, hello tokenizers; 123 456 789.",
] * 20
PROMPTS = ["The movie was", "Hello world, the fox", "café naïve — 12 dogs!"]


def _byte_level_files(tmp_path, specials):
    return byte_level_bpe(tmp_path / "bpe", CORPUS, specials)


@pytest.fixture
def gpt2_dir(tmp_path):
    files = _byte_level_files(tmp_path, ["<|endoftext|>"])
    tok = transformers.GPT2TokenizerFast(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"))
    out = tmp_path / "gpt2"
    tok.save_pretrained(str(out))  # tokenizer.json + tokenizer_config.json
    for name in ("vocab.json", "merges.txt"):  # what older transformers (and the hub's gpt2) ship too
        shutil.copyfile(files / name, out / name)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(str(out))
    return out, tok, model


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json+merges.txt"])
def test_gpt2_tokenizer_ids_and_greedy_generation_match_transformers(gpt2_dir, files):
    out, hf_tok, model = gpt2_dir
    if files != "tokenizer.json":
        (out / "tokenizer.json").unlink()
    tok = load_tokenizer(out)
    assert isinstance(tok, BPETokenizer) and tok.kind == "gpt2" and tok.eos_id == hf_tok.eos_token_id
    assert len(hf_tok) > 300
    for p in PROMPTS + ["<|endoftext|>The end"]:
        assert tok.encode_ids(p) == [hf_tok(p)["input_ids"]], p
        assert tok.decode(hf_tok(p)["input_ids"], skip_special_tokens=False) == p
    params, cfg = load_gpt2(out)
    for p in PROMPTS:
        ids = tok.encode_ids(p)[0]
        with torch.no_grad():
            want = model.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=hf_tok.eos_token_id
            )[0, len(ids) :].tolist()
        got = generate(params, cfg, [ids], max_new_tokens=12, compile=False)[0]
        assert got == want, (got, want)
        assert tok.decode(got) == hf_tok.decode(want[: len(got)], skip_special_tokens=True)


def test_roberta_tokenizer_matches_transformers(tmp_path):
    files = _byte_level_files(tmp_path, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    hf_tok = transformers.RobertaTokenizerFast(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"))
    hf_tok.save_pretrained(str(tmp_path / "rob"))
    for d in (tmp_path / "rob", files):  # saved by transformers; bare vocab.json + merges.txt
        tok = load_tokenizer(d)
        assert tok.kind == "roberta" and (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (
            hf_tok.cls_token_id,
            hf_tok.sep_token_id,
            hf_tok.pad_token_id,
            hf_tok.mask_token_id,
        )
        want = hf_tok(PROMPTS, padding=True, return_tensors="pt")
        got = tok(PROMPTS)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
            got["attention_mask"], want["attention_mask"]
        )
        pair = hf_tok(PROMPTS[0], PROMPTS[1])["input_ids"]
        assert tok.encode_ids([PROMPTS[0]], pairs=[PROMPTS[1]]) == [pair]
        cut = hf_tok(PROMPTS[1], truncation=True, max_length=5)["input_ids"]
        assert tok.encode_ids(PROMPTS[1], max_len=5) == [cut]
