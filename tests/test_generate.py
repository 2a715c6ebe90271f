"""Generation: cached greedy equals uncached greedy; batched equals one at a time; samplers."""

import shutil

import pytest
import torch
from tests.conftest import tiny_config

from llmlab.generate import (
    generate,
    generate_tokens,
    sample_from,
    sample_next,
    sampling_distribution,
    top_k_filter,
    top_p_filter,
)
from llmlab.model import build_model


def _m(**kw):
    torch.manual_seed(0)
    kw.setdefault("init_std", 0.2)
    return build_model(tiny_config(**kw)).eval()


@pytest.mark.parametrize("pe,window", [("rope", None), ("sinusoidal", None), ("alibi", None),
                                       ("yarn", None), ("rope", 4), ("alibi", 5)])
def test_cached_greedy_equals_uncached(pe, window, monkeypatch):
    import llmlab.generate as gen

    m = _m(positional_encoding=pe, sliding_window=window, rope_scaling_factor=2.0 if pe == "yarn" else 1.0,
           init_std=0.5)  # large enough weights for varied greedy tokens
    prompt = torch.randint(0, 128, (1, 7))
    seen = []  # the logits each cached step samples from (20 steps: the CPU decode weights are on)
    real = gen.sample_next
    monkeypatch.setattr(gen, "sample_next", lambda logits, *a, **kw: seen.append(logits.clone()) or real(logits, *a, **kw))
    a = generate(m, prompt, max_new_tokens=20, temperature=0)
    monkeypatch.setattr(gen, "sample_next", real)
    b = generate(m, prompt, max_new_tokens=20, temperature=0, use_cache=False)
    assert a.shape == (1, 27)
    assert torch.equal(a, b)
    assert len(set(a[0, 7:].tolist())) >= 4  # varied tokens, not one repeated
    assert len(seen) == 20 and m.head_decode_weight is None
    with torch.no_grad():
        full = m(a[:, :-1])[0, 6:]  # the plain forward over the whole sequence: position 6 + t predicts token t
    scale = float(full.abs().max())  # logits of size ~10: float32 rounding of the cached path stays ~1e-6 of it
    torch.testing.assert_close(torch.cat(seen), full, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("pe,window", [("rope", None), ("sinusoidal", None), ("alibi", 4)])
def test_batched_left_padded_equals_one_at_a_time(pe, window):
    m = _m(positional_encoding=pe, sliding_window=window)
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13, 14]]
    batched = generate_tokens(m, prompts, max_new_tokens=12, temperature=0).responses
    single = [generate_tokens(m, [p], max_new_tokens=12, temperature=0).responses[0] for p in prompts]
    assert batched == single
    uncached = generate_tokens(m, prompts, max_new_tokens=12, temperature=0, use_cache=False).responses
    assert uncached == single


def test_stop_per_sequence_and_bounds():
    m = _m()
    prompts = [[1, 2, 3], [4, 5, 6]]
    free = generate_tokens(m, prompts, max_new_tokens=10, temperature=0).responses
    eos = free[0][2]  # make sequence 0 stop at its third token
    out = generate_tokens(m, prompts, max_new_tokens=10, temperature=0, eos_token_id=eos, pad_token_id=0)
    r = out.responses
    assert r[0] == free[0][:3]
    assert r[1] == (free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1])
    assert out.response_mask[0].sum() == 3
    # bounded by max_seq_len (64): a 60-token prompt leaves room for 4 new tokens
    long = generate(m, torch.randint(0, 128, (1, 60)), max_new_tokens=50, temperature=0)
    assert long.shape[1] == 64


@pytest.mark.parametrize("prompt,match", [
    ("To be", r"^prompt: text given, but generation takes token ids; tokenize it first"),
    (["To be", "or not"], r"^prompt: text given"),
    (torch.tensor([[1.0, 2.0]]), r"^prompt: expected token ids as a \(B, T\) or \(T,\) integer tensor, got shape \(1, 2\) of "
                                 r"torch.float32$"),
    (torch.ones(1, 2, 3, dtype=torch.long), r"^prompt: expected token ids .* got shape \(1, 2, 3\)"),
    ([[1, 2], [3, 2.5]], r"^prompt: 2.5 \(row 1\) is not a token id \(an integer\)"),
])
def test_a_prompt_that_is_not_token_ids_is_a_one_line_error(prompt, match):
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError, match=match):  # was a TypeError deep inside, or floats cut to ints silently
        generate(_m(), prompt, max_new_tokens=2, temperature=0)


@pytest.mark.parametrize("setting,match", [
    (dict(max_new_tokens=-1), r"^max_new_tokens: must be >= 0, got -1$"),
    (dict(temperature=-0.5), r"^temperature: must be >= 0 \(0 = greedy\), got -0.5$"),
    (dict(temperature=float("nan")), r"^temperature: must be >= 0"),
    (dict(top_k=-1), r"^top_k: must be >= 0 \(0 = off\), got -1$"),
    (dict(top_p=0.0), r"^top_p: must be in \(0, 1\] \(1 = off\), got 0.0$"),
    (dict(top_p=1.5), r"^top_p: must be in \(0, 1\]"),
])
def test_sampling_settings_out_of_range_are_a_one_line_error(setting, match):
    from llmlab.errors import ConfigError

    # the chat REPL refused these; from Python a negative temperature sampled greedily and top_p 0 kept one
    # token without a word, and max_new_tokens=-1 returned the prompt
    with pytest.raises(ConfigError, match=match):
        generate_tokens(_m(), [[1, 2, 3]], **setting)
    assert generate_tokens(_m(), [[1, 2, 3]], max_new_tokens=0).sequences.tolist() == [[1, 2, 3]]  # RL: 0 is fine


def test_numpy_token_ids_are_prompts():
    np = pytest.importorskip("numpy")
    m = _m()
    want = generate(m, [[1, 2, 3]], max_new_tokens=3, temperature=0)
    assert torch.equal(generate(m, np.array([1, 2, 3]), max_new_tokens=3, temperature=0), want)
    assert torch.equal(generate(m, np.array([[1, 2, 3]]), max_new_tokens=3, temperature=0), want)


def test_samplers():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    p = logits.softmax(-1)[0]  # sorted probs: .665, .245, .090, .033
    kept = ~torch.isinf(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[False, True, True, False]]
    assert (~torch.isinf(top_p_filter(logits, float(p[1]) - 1e-3))).sum() == 1
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {1, 2}
    frac = (draws == 1).float().mean().item()
    assert abs(frac - 1 / (1 + torch.e**-1)) < 0.08  # p(1) = e^3 / (e^3 + e^2)


def test_forward_hooks_on_lm_head_fire_during_cached_generation():
    """The CPU decode fast path must not bypass user hooks on the head: forcing a token through a hook
    changes what is generated."""
    m = _m()
    handle = m.lm_head.register_forward_hook(lambda mod, args, out: out.index_fill(-1, torch.tensor([7]), 1e4))
    out = generate_tokens(m, [[1, 2, 3]], max_new_tokens=10, temperature=0).responses[0]
    handle.remove()
    assert out == [7] * 10


@pytest.mark.parametrize("pe,window", [("rope", None), ("alibi", None), ("sinusoidal", None), ("rope", 4),
                                       ("yarn", None)])
def test_static_cache_steps_equal_the_growing_cache(pe, window, monkeypatch):
    """compile=True's static cache (whole-buffer attention, unfilled slots masked, fill level a tensor),
    run eagerly: the same tokens as the growing cache, left padding and sliding windows included."""
    m = _m(positional_encoding=pe, sliding_window=window, rope_scaling_factor=2.0 if pe == "yarn" else 1.0)
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13, 14]]
    plain = generate_tokens(m, prompts, max_new_tokens=12, temperature=0).responses
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    static = generate_tokens(m, prompts, max_new_tokens=12, temperature=0, compile=True).responses
    assert static == plain


@pytest.mark.parametrize("pe,window", [("rope", None), ("alibi", None), ("rope", 4)])
def test_graph_cache_is_reused_emptied_and_masked_over_its_rounded_length(pe, window, monkeypatch):
    """compile=True's CUDA-graph path, run eagerly on CPU: the cache is rounded up to GRAPH_SLOTS slots
    (padding mask widened to match) and kept with the model; the next call of the same batch size
    reuses the same buffers, emptied, with stale keys in them, and still gives the growing cache's tokens."""
    import llmlab.generate as gen

    m = _m(positional_encoding=pe, sliding_window=window)
    calls = [[[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13, 14]], [[20, 21], [22, 23, 24, 25, 26, 27, 28], [29]]]
    plain = [generate_tokens(m, p, max_new_tokens=12, temperature=0).responses for p in calls]
    monkeypatch.setattr(gen, "GRAPH_DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    buffers = []
    for prompts, want in zip(calls, plain):
        assert generate_tokens(m, prompts, max_new_tokens=12, temperature=0, compile=True).responses == want
        (key, cache), = gen._graph_caches[m].items()
        assert key == (3, gen.GRAPH_SLOTS, torch.device("cpu")) and int(cache.length) > 12
        buffers.append(cache.k[0].data_ptr())
    assert buffers[0] == buffers[1]  # the same buffers: a recorded graph's addresses stay valid
    for batch in range(1, gen.GRAPH_CACHES + 1):  # other sizes: fresh caches, the least recent dropped
        assert gen.graph_cache(m, batch, 300, torch.device("cpu")).max_len == 2 * gen.GRAPH_SLOTS
    assert [key[0] for key in gen._graph_caches[m]] == list(range(1, gen.GRAPH_CACHES + 1))


def test_compile_without_a_compiler_is_a_one_line_error(monkeypatch):
    from llmlab.errors import ConfigError

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="compile: torch.compile on CPU needs a C/C.. compiler"):
        generate_tokens(_m(), [[1, 2]], max_new_tokens=8, temperature=0, compile=True)


HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_generation_equals_eager(monkeypatch):
    m = _m()
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4]]
    eager = generate_tokens(m, prompts, max_new_tokens=10, temperature=0)
    compiled_models, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled_models.append(model) or real_compile(model, **kw))
    compiled = generate_tokens(m, prompts, max_new_tokens=10, temperature=0, compile=True)
    assert compiled_models == [m]  # the decode steps really went through torch.compile
    assert torch.equal(compiled.sequences, eager.sequences)
    assert compiled.responses == eager.responses


def _reference_distribution(logits, top_k, top_p):
    return top_p_filter(top_k_filter(logits, top_k), top_p).softmax(-1)


@pytest.mark.parametrize("vocab,scale", [(50, 2.0), (3000, 8.0), (3000, 0.05)])  # small; peaked; near-flat
@pytest.mark.parametrize("top_k", [0, 5, 1500, 3000])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
def test_sampling_distribution_equals_the_filters(vocab, scale, top_k, top_p):
    g = torch.Generator().manual_seed(vocab + top_k)
    logits = torch.randn(3, vocab, generator=g) * scale
    logits[1, 7] = float("-inf")  # a token masked out (e.g. by a hook)
    weights, ids = sampling_distribution(logits, top_k, top_p)
    dist = torch.zeros_like(logits)
    dist = weights if ids is None else dist.scatter(-1, ids, weights)
    dist = dist / dist.sum(-1, keepdim=True)
    torch.testing.assert_close(dist, _reference_distribution(logits, top_k, top_p), rtol=1e-4, atol=1e-6)


def test_nucleus_within_the_candidates_sorts_no_whole_vocabulary(monkeypatch):
    import llmlab.generate as gen

    logits = torch.randn(2, 20000, generator=torch.Generator().manual_seed(0)) * 8  # peaked: a small nucleus
    want = _reference_distribution(logits, 0, 0.9)
    monkeypatch.setattr(gen, "top_p_filter", lambda *a: pytest.fail("sorted the whole vocabulary"))
    weights, ids = sampling_distribution(logits, 0, 0.9)
    assert ids.shape[-1] == gen.NUCLEUS_CANDIDATES[0]
    got = torch.zeros_like(logits).scatter(-1, ids, weights)
    torch.testing.assert_close(got / got.sum(-1, keepdim=True), want, rtol=1e-4, atol=1e-6)


def test_a_wider_nucleus_is_found_among_more_candidates_before_a_full_sort(monkeypatch):
    import llmlab.generate as gen

    logits = torch.randn(2, 40000, generator=torch.Generator().manual_seed(0)) * 2.0  # flatter: a wide nucleus
    want = _reference_distribution(logits, 0, 0.9)
    monkeypatch.setattr(gen, "top_p_filter", lambda *a: pytest.fail("sorted the whole vocabulary"))
    weights, ids = sampling_distribution(logits, 0, 0.9)
    assert ids.shape[-1] == gen.NUCLEUS_CANDIDATES[1] and (weights > 0).sum(-1).min() > gen.NUCLEUS_CANDIDATES[0]
    got = torch.zeros_like(logits).scatter(-1, ids, weights)
    torch.testing.assert_close(got / got.sum(-1, keepdim=True), want, rtol=1e-4, atol=1e-6)


def test_sample_from_draws_in_proportion():
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0, 4.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_from(weights, g) for _ in range(4000)])
    assert set(draws[:, 0].tolist()) == {1, 2, 4} and set(draws[:, 1].tolist()) == {0}
    freq = torch.bincount(draws[:, 0], minlength=5).float() / 4000
    torch.testing.assert_close(freq, weights[0] / 8, atol=0.03, rtol=0)
