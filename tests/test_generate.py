"""KV-cache decoding: cached == full forward, greedy == HF generate, sampling rules, one compiled
decode graph, bad input; the encoder–decoder's cached greedy decoding == recomputing the prefix."""

from __future__ import annotations

import pytest
import torch
import transformers

import fnlm
from fnlm.models import (
    GPT2Config,
    decode_step,
    filter_logits,
    generate,
    gpt2,
    init_gpt2,
    init_gpt2_cache,
    left_pad,
    load_gpt2,
    prefill,
    sample_logits,
)

transformers.logging.set_verbosity_error()
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def hf_and_fnlm(tmp_path_factory):
    """A random GPT-2 whose greedy continuations are not one repeated token (wide init)."""
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        vocab_size=97,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hc).eval()
    d = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(d)
    params, cfg = load_gpt2(d)
    return hf, params, cfg


def test_greedy_equals_hf_generate_for_a_ragged_batch(hf_and_fnlm):
    hf, params, cfg = hf_and_fnlm
    out = generate(params, cfg, PROMPTS, max_new_tokens=40, compile=False)
    ids, start = left_pad(PROMPTS)
    mask = (torch.arange(ids.shape[1])[None] >= start[:, None]).long()
    with torch.no_grad():
        ref = hf.generate(
            ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    ref = ref[:, ids.shape[1] :].tolist()
    assert out == ref
    assert all(len(set(row)) > 3 for row in out)  # a real test: continuations vary


def test_cached_equals_full_forward_at_every_position(hf_and_fnlm):
    _, params, cfg = hf_and_fnlm
    ids, start = left_pad([[3, 4, 5, 6, 7, 8], [20, 21]])  # row 1 is left-padded by 4
    cont = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    seq = torch.cat([ids, cont], dim=1)
    mask = (torch.arange(seq.shape[1])[None] >= start[:, None]).long()
    full = gpt2(params, seq, cfg, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    cache = init_gpt2_cache(cfg, 2, seq.shape[1] + 5, start=start)  # a few spare slots
    logits, cache = prefill(params, cache, ids, cfg)
    torch.testing.assert_close(logits, full[:, ids.shape[1] - 1], atol=1e-5, rtol=0)
    for t in range(ids.shape[1], seq.shape[1]):
        logits, cache = decode_step(params, cache, seq[:, t], cfg)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0, msg=f"position {t}")
    assert int(cache["pos"]) == seq.shape[1]


def test_decode_step_is_pure_and_the_inplace_variant_agrees(hf_and_fnlm):
    _, params, cfg = hf_and_fnlm
    ids, start = left_pad([[3, 4, 5], [7]])
    cache = init_gpt2_cache(cfg, 2, 8, start=start)
    _, cache = prefill(params, cache, ids, cfg)
    before = fnlm.tree.tree_map(torch.clone, cache)
    tok = torch.tensor([9, 10])
    logits, new = decode_step(params, cache, tok, cfg)
    assert fnlm.tree.tree_allclose(cache, before, atol=0, rtol=0)  # the input cache is untouched
    logits_ip, new_ip = decode_step(params, cache, tok, cfg, inplace=True)
    assert torch.equal(logits_ip, logits) and fnlm.tree.tree_allclose(new_ip, new, atol=0, rtol=0)
    assert new_ip["layers"][0]["k"] is cache["layers"][0]["k"]  # written into the caller's buffers


def test_one_compiled_graph_for_100_decode_steps():
    from torch._dynamo.utils import counters

    cfg = GPT2Config(vocab_size=64, n_positions=128, n_embd=16, n_layer=1, n_head=2)
    params = init_gpt2(fnlm.random.key(0), cfg)
    torch._dynamo.reset()
    counters.clear()
    eager = generate(params, cfg, [[1, 2, 3]], max_new_tokens=101, compile=False)
    compiled = generate(params, cfg, [[1, 2, 3]], max_new_tokens=101, compile="aot_eager")  # 100 decode steps
    assert counters["stats"]["unique_graphs"] == 1  # a recompile would add a graph
    assert compiled == eager


def test_matvec_layout_keeps_values_and_stores_inputs_innermost(hf_and_fnlm):
    from fnlm.models import input_axes_innermost, matvec_layout

    _, params, cfg = hf_and_fnlm
    w = torch.randn(4, 3, 5)
    t = input_axes_innermost(w, 2)  # inputs (4, 3), output 5
    assert torch.equal(t, w) and t.stride() == (3, 1, 12)
    laid = matvec_layout(params)
    assert fnlm.tree.tree_allclose(laid, params, atol=0, rtol=0)
    q, o = laid["layers"][0]["attn"]["q"]["weight"], laid["layers"][0]["attn"]["o"]["weight"]
    assert q.stride(0) == 1 and o.stride(1) == 1 and laid["layers"][1]["ffn"]["w2"]["weight"].stride(0) == 1


def test_matvec_pass_rewrites_every_product_and_keeps_logits_and_tokens(hf_and_fnlm):
    from torch._dynamo.utils import counters

    from fnlm.models import matvec_layout, matvec_pass
    from fnlm.train import compile_fn

    hf, params, cfg = hf_and_fnlm
    prompt = [PROMPTS[1]]
    cache = init_gpt2_cache(cfg, 1, 12)
    _, cache = prefill(params, cache, torch.tensor(prompt), cfg)
    tok = torch.tensor([9])
    ref, _ = decode_step(params, cache, tok, cfg)
    counters.clear()
    step = compile_fn(
        lambda p, c, t: decode_step(p, c, t, cfg),
        compile_options={"post_grad_custom_post_pass": matvec_pass(), "fx_graph_cache": False},
    )  # so the pass runs
    with torch.no_grad():
        logits, _ = step(matvec_layout(params), cache, tok)
    # q, k, v, o, W_1, W_2 per layer and the tied LM head (E^T, input-contiguous without a copy)
    assert counters["inductor"]["fnlm_matvec"] == 6 * cfg.n_layer + 1
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    # compiled on a CPU: the matvec path by default for one row; matvec=True for 4 rows: the layout, BLAS products
    for prompts, matvec in ((prompt, None), (PROMPTS, True)):
        counters.clear()
        out = generate(params, cfg, prompts, max_new_tokens=33, matvec=matvec)
        assert counters["inductor"]["fnlm_matvec"] in (0, 6 * cfg.n_layer + 1)  # 0: Inductor's cache had it
        ids, start = left_pad(prompts)
        mask = (torch.arange(ids.shape[1])[None] >= start[:, None]).long()
        with torch.no_grad():
            want = hf.generate(
                ids, attention_mask=mask, max_new_tokens=33, do_sample=False, pad_token_id=0, eos_token_id=None
            )[:, ids.shape[1] :].tolist()
        assert out == want and all(len(set(row)) > 3 for row in want)


def test_sampling_is_keyed_and_temperature_zero_is_greedy(hf_and_fnlm):
    _, params, cfg = hf_and_fnlm
    kw = dict(max_new_tokens=12, compile=False)
    a = generate(params, cfg, PROMPTS, key=fnlm.random.key(1), temperature=1.0, **kw)
    b = generate(params, cfg, PROMPTS, key=fnlm.random.key(1), temperature=1.0, **kw)
    c = generate(params, cfg, PROMPTS, key=fnlm.random.key(2), temperature=1.0, **kw)
    assert a == b and a != c
    greedy = generate(params, cfg, PROMPTS, **kw)
    assert generate(params, cfg, PROMPTS, key=fnlm.random.key(3), temperature=1e-4, **kw) == greedy
    assert generate(params, cfg, PROMPTS, key=fnlm.random.key(3), temperature=5.0, top_k=1, **kw) == greedy


def test_samples_follow_the_filtered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    draws = sample_logits(logits.expand(n, -1), fnlm.random.key(0), temperature=1.0)
    freq = torch.bincount(draws, minlength=6).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.01, rtol=0)
    topk = sample_logits(logits.expand(n, -1), fnlm.random.key(1), temperature=2.0, top_k=3)
    assert set(topk.unique().tolist()) == {0, 1, 2}  # never outside the top 3, and all 3 occur


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    z = probs.log()
    kept = lambda p: set(torch.isfinite(filter_logits(z, top_p=p)).nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.5) == {1}
    assert kept(0.79) == {1, 3}
    assert kept(0.8001) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}
    draws = sample_logits(z.expand(5000, -1), fnlm.random.key(0), top_p=0.79)
    assert set(draws.unique().tolist()) == {1, 3}


def test_per_row_stop_tokens_and_max_new_tokens(hf_and_fnlm):
    _, params, cfg = hf_and_fnlm
    full = generate(params, cfg, PROMPTS, max_new_tokens=20, compile=False)
    assert [len(r) for r in full] == [20] * 4
    stops = [[full[0][4]], [full[1][0]], [], [full[3][9], full[3][2]]]
    out = generate(params, cfg, PROMPTS, max_new_tokens=20, stop_tokens=stops, compile=False)
    for row, ref, s in zip(out, full, stops):
        end = min([ref.index(t) for t in s if t in ref], default=len(ref) - 1)
        assert row == ref[: end + 1]


def test_bad_input_is_a_one_line_error_before_compute(hf_and_fnlm):
    _, params, cfg = hf_and_fnlm
    cases = [
        (
            dict(prompts=[[1] * 100], max_new_tokens=29),
            "prompt length 100 \\+ max_new_tokens 29 = 129 is longer than the position table",
        ),
        (dict(prompts=[[1, 2], []], max_new_tokens=4), "empty prompt\\(s\\) at row\\(s\\) \\[1\\]"),
        (dict(prompts=[[1, 2]], max_new_tokens=4, cache_len=5), "cache_len=5 is too small"),
        (
            dict(prompts=[[1, 200]], max_new_tokens=4),
            "prompt token ids contain 200, outside the vocabulary \\[0, 97\\)",
        ),
        (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(prompts=[[1]], max_new_tokens=3, temperature=1.0), "needs key="),
        (dict(prompts=[[1]], max_new_tokens=3, top_p=1.5), "top_p must be in"),
        (dict(prompts=[[1]], max_new_tokens=3, stop_tokens=[500]), "stop_tokens contain 500"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            generate(params, cfg, compile=False, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="longer than the position table"):
        init_gpt2_cache(cfg, 1, 129)
    with pytest.raises(ValueError, match="left padding"):
        generate(
            params,
            cfg,
            torch.ones(1, 3, dtype=torch.long),
            attention_mask=torch.tensor([[1, 0, 1]]),
            max_new_tokens=2,
            compile=False,
        )


# ----------------------------------------------------------------------------- encoder–decoder
def greedy_recomputing(params, src, cfg, bos_id, max_len, src_padding_mask=None):
    """The previous greedy_decode: the whole prefix through the decoder at every step."""
    memory = fnlm.encode(params, src, cfg, src_padding_mask=src_padding_mask)
    ys = torch.full((src.shape[0], 1), bos_id, dtype=torch.long)
    for _ in range(max_len - 1):
        logits = fnlm.decode(params, ys, memory, cfg, memory_padding_mask=src_padding_mask)
        ys = torch.cat([ys, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return ys


@pytest.mark.parametrize(
    "kw",
    [
        dict(positional="sinusoidal"),
        dict(positional="learned", norm_first=True),
        dict(positional="relative", tie_output=True),
    ],
)
def test_encoder_decoder_cached_greedy_equals_recomputing(kw):
    cfg = fnlm.TransformerConfig(
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_layers=2,
        src_vocab_size=23,
        tgt_vocab_size=23 if kw.get("tie_output") else 19,
        max_len=24,
        init_std=0.5,
        **kw,
    )
    params = fnlm.init_transformer(fnlm.random.key(0), cfg)
    src = torch.randint(0, 23, (3, 7), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(3, 7, dtype=torch.bool)
    pad[1, 4:] = False
    ref = greedy_recomputing(params, src, cfg, 1, 12, pad)
    out = fnlm.greedy_decode(params, src, cfg, bos_id=1, max_len=12, src_padding_mask=pad)
    assert torch.equal(out, ref)
    # random small models repeat one token, so also check the cached logits on a varied target:
    # equal to the full decoder's at every position
    tgt = torch.randint(0, cfg.tgt_vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    memory = fnlm.encode(params, src, cfg, src_padding_mask=pad)
    full = fnlm.decode(params, tgt, memory, cfg, memory_padding_mask=pad)
    cache = fnlm.models.init_decoder_cache(params, memory, cfg, 12)
    for t in range(12):
        logits, cache = fnlm.models.decode_cached(params, tgt[:, t : t + 1], cache, cfg, memory_padding_mask=pad)
        torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
