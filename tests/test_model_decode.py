"""CPU decode weights (llmlab.model.decode): the same numbers as the plain forward, rebuilt when the
weights change, freed when asked, never bypassing PEFT wrappers or hooks."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_config

import llmlab.model.linear as linear_mod
from llmlab.generate import generate_tokens
from llmlab.model import build_model
from llmlab.model.decode import DecodeStep, decode_step, decode_weights
from llmlab.model.linear import decode_mm, pack, split_count
from llmlab.model.norms import rms_norm_by_layer_norm


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out", [96, 50, 7])
@pytest.mark.parametrize("onednn", [True, False])
def test_decode_mm_equals_linear(threads, rows, out, onednn, monkeypatch):
    if onednn:  # several rows to oneDNN at once, whatever the size
        monkeypatch.setattr(linear_mod, "DECODE_MIN_MACS", 0)
    else:  # several rows then go through the blocked bmm as well
        monkeypatch.setattr(linear_mod, "_onednn", lambda *a, **kw: False)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ws = [torch.randn(out, 24), torch.randn(out // 2 + 1, 24)]
        x = torch.randn(2, rows, 24)
        w = pack(ws, threads)
        assert w.shape[0] == split_count(sum(t.shape[0] for t in ws), threads)
        torch.testing.assert_close(decode_mm(x, w), F.linear(x, torch.cat(ws)), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.skipif(not linear_mod.onednn_ready(), reason="no oneDNN inner product in this torch build")
def test_batched_decoding_products_go_to_onednn_from_the_size_floor(monkeypatch):
    seen = []
    real = linear_mod._onednn
    monkeypatch.setattr(linear_mod, "_onednn", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    w = pack([torch.randn(1024, 384)], 2)  # 8 rows x 384 x 1024 = 2^21.6 multiply-adds
    x = torch.randn(8, 1, 384)
    torch.testing.assert_close(decode_mm(x, w), F.linear(x, w.view(1024, 384)), rtol=1e-5, atol=1e-4)
    assert seen == [True]
    seen.clear()
    decode_mm(torch.randn(2, 1, 384), pack([torch.randn(256, 384)], 2))  # 2^17.6: the blocked bmm
    assert seen == [False]


def test_single_weight_is_a_view_not_a_copy():
    w = torch.randn(64, 16)
    assert pack([w], 2).data_ptr() == w.data_ptr()
    assert pack([w, w], 2).data_ptr() != w.data_ptr()


def _model(**kw):
    torch.manual_seed(0)
    return build_model(tiny_config(init_std=0.2, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"attention_bias": True}, {"activation": "gelu"}, {"n_kv_heads": 4},
                                {"positional_encoding": "alibi"}, {"positional_encoding": "sinusoidal"},
                                {"positional_encoding": "yarn", "rope_scaling_factor": 2.0}, {"sliding_window": 4}])
def test_decode_logits_equal_plain_forward(kw):
    m = _model(**kw)
    ids = torch.randint(0, 128, (3, 9))
    with torch.no_grad():
        plain = m(ids)
        with decode_weights(m):
            assert m.layers[0].self_attn.qkv_decode is not None  # the fast path is really on
            fast = m(ids)
        assert m.layers[0].self_attn.qkv_decode is None  # and off again outside the block
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def _greedy_reference(m, prompt, n):
    """Greedy continuation through the plain (training) forward: gradients on, no cache, no decode path."""
    ids = torch.tensor([prompt])
    with torch.enable_grad():
        for _ in range(n):
            ids = torch.cat([ids, m(ids)[:, -1:].argmax(-1)], 1)
    return ids[0, len(prompt):].tolist()


def test_changed_weights_rebuild_the_cached_copies():
    m = _model()
    prompt = [1, 2, 3]
    before = generate_tokens(m, [prompt], max_new_tokens=12, temperature=0).responses[0]
    assert "qkv_decode" in m.layers[0].self_attn._decode_cache  # eval mode keeps the fused copies
    with torch.no_grad():  # an in-place edit, as an optimizer step makes
        for layer in m.layers:
            layer.self_attn.k_proj.weight.mul_(-3.0)
            layer.mlp.up_proj.weight.add_(0.3)
    after = generate_tokens(m, [prompt], max_new_tokens=12, temperature=0).responses[0]
    assert after != before
    assert after == _greedy_reference(m, prompt, 12)


def test_training_mode_frees_the_copies():
    m = _model()
    m.train()
    generate_tokens(m, [[1, 2, 3]], max_new_tokens=10, temperature=0)
    assert m.training
    assert not m.layers[0].self_attn.__dict__.get("_decode_cache")
    assert not m.layers[0].mlp.__dict__.get("_decode_cache")


def test_copies_over_the_size_cap_are_not_kept(monkeypatch):
    import llmlab.model.decode as decode

    m = _model()
    monkeypatch.setattr(decode, "KEEP_MAX_BYTES", 1000)  # the tiny model's fused copies are larger than this
    generate_tokens(m, [[1, 2, 3]], max_new_tokens=10, temperature=0)
    assert not m.layers[0].self_attn.__dict__.get("_decode_cache")
    monkeypatch.setattr(decode, "KEEP_MAX_BYTES", 1 << 30)
    generate_tokens(m, [[1, 2, 3]], max_new_tokens=10, temperature=0)
    assert "qkv_decode" in m.layers[0].self_attn._decode_cache


def test_hooks_on_fused_projections_still_fire():
    m = _model()
    prompt = [4, 5, 6]
    free = generate_tokens(m, [prompt], max_new_tokens=10, temperature=0).responses[0]
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda mod, args, out: -out) for layer in m.layers]
    hooks += [layer.mlp.gate_proj.register_forward_hook(lambda mod, args, out: out * 4) for layer in m.layers]
    hooked = generate_tokens(m, [prompt], max_new_tokens=10, temperature=0).responses[0]
    reference = _greedy_reference(m, prompt, 10)
    for h in hooks:
        h.remove()
    assert hooked == reference
    assert hooked != free


@pytest.mark.parametrize("shift", [0.0, 30.0])
def test_rms_norm_by_layer_norm_equals_rms_norm(shift):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 48, generator=g) * 4 + shift  # far-from-zero means too: (x, -x) still has mean 0
    w = torch.randn(48, generator=g)
    got = rms_norm_by_layer_norm(x, torch.cat((w, w)), 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (48,), w, 1e-5), rtol=1e-6, atol=1e-6)


def test_decode_steps_use_the_layer_norm_form_and_match_the_plain_forward(monkeypatch):
    import llmlab.model.norms as norms

    m = _model()
    calls = []
    real = norms.rms_norm_by_layer_norm
    monkeypatch.setattr(norms, "rms_norm_by_layer_norm", lambda *a: calls.append(a[0].shape) or real(*a))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        plain = m(ids)[:, -1]
        with decode_weights(m):
            cache = m.new_cache(16)
            m(ids[:, :-1], cache=cache)  # the prefill (6 rows a sequence): F.rms_norm
            assert not calls
            step = m(ids[:, -1:], cache=cache)[:, -1]  # one row a sequence: the layer-norm form
    assert len(calls) == 2 * len(m.layers) + 1
    assert m.norm.decode_weight is None  # off again outside the block
    torch.testing.assert_close(step, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"attention_bias": True}, {"activation": "gelu"}, {"norm_type": "layernorm"},
                                {"positional_encoding": "alibi"}, {"positional_encoding": "sinusoidal"},
                                {"positional_encoding": "yarn", "rope_scaling_factor": 2.0}, {"sliding_window": 4}])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_equals_the_models_forward(kw, padded):
    m = _model(**kw)
    ids = torch.randint(1, 128, (3, 8))
    padding = torch.ones(3, 9, dtype=torch.long)
    if padded:
        padding[1, :3] = 0  # row 1 is left-padded
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), decode_weights(m):
        step = decode_step(m, 12)
        assert isinstance(step, DecodeStep)
        caches = [m.new_cache(12), m.new_cache(12)]
        for c in caches:
            m(ids[:, :7], attention_mask=padding[:, :7], cache=c)
        want = m(ids[:, 7:], attention_mask=padding[:, :8], position_ids=positions[:, 7:8], cache=caches[0], last_only=True)
        got = step(ids[:, 7:], positions[:, 7:8], padding[:, :8], caches[1])
        assert caches[1].length == caches[0].length == 8
        torch.testing.assert_close(caches[1].k[1][:, :, :8], caches[0].k[1][:, :, :8], rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_decode_step_only_for_plain_models_and_generation_uses_it(monkeypatch):
    import llmlab.generate as gen
    from llmlab.lora import apply_lora

    m = _model()
    with torch.no_grad(), decode_weights(m):
        assert decode_step(m, 16) is not None
        m.train()
        assert decode_step(m, 16) is None  # dropout would apply
        m.eval()
        hook = m.layers[1].mlp.register_forward_hook(lambda mod, args, out: out)
        assert decode_step(m, 16) is None  # the step skips module calls: hooks would not fire
        hook.remove()
        hook = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: out)
        assert decode_step(m, 16) is None
        hook.remove()
        assert decode_step(m, 16) is not None
    built = []
    monkeypatch.setattr(gen, "decode_step", lambda model, n: built.append(decode_step(model, n)) or built[-1])
    prompt = [3, 1, 4]
    out = generate_tokens(m, [prompt], max_new_tokens=10, temperature=0).responses[0]
    assert isinstance(built[0], DecodeStep)
    assert out == _greedy_reference(m, prompt, 10)
    lora = apply_lora(_model(), SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_preset="attention_only",
                                                lora_target_modules=None), verbose=False).eval()
    generate_tokens(lora, [prompt], max_new_tokens=10, temperature=0)
    assert built[-1] is None  # a PEFT model: its own forward
    with torch.no_grad(), decode_weights(lora.get_base_model()):
        assert decode_step(lora.get_base_model(), 16) is None  # LoRA layers injected into the base model


@pytest.mark.parametrize("kw", [{}, {"positional_encoding": "yarn", "rope_scaling_factor": 4.0},
                                {"positional_encoding": "alibi"}])
def test_step_prepare_equals_prepare(kw):
    positions = build_model(tiny_config(**kw)).positions
    ids = torch.tensor([[5], [0], [19]])
    got, want = positions.step_prepare(20)(ids), positions.prepare(ids)
    for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        assert torch.equal(g, w)


@pytest.mark.skipif(not linear_mod.onednn_ready(), reason="needs oneDNN")
@pytest.mark.parametrize("kw", [{}, {"attention_bias": True}, {"activation": "gelu"}, {"tie_embeddings": True}])
def test_packed_decode_weights_equal_plain_forward(kw):
    m = _model(**kw)
    ids = torch.randint(0, 128, (5, 9))
    with torch.no_grad():
        plain = m(ids)
        with decode_weights(m, packed=True):
            assert m.layers[0].self_attn.qkv_decode.is_mkldnn and m.layers[0].mlp.down_proj.decode_weight.is_mkldnn
            assert m.head_decode_weight.is_mkldnn
            fast = m(ids)  # the prefill shape: 45 rows
            cache = m.new_cache(12)
            m(ids[:, :-1], cache=cache)
            step = m(ids[:, -1:], cache=cache)  # 5 rows
        assert m.layers[0].self_attn.qkv_decode is None
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, -1], plain[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not linear_mod.onednn_ready(), reason="needs oneDNN")
def test_generation_packs_weights_from_four_rows(monkeypatch):
    import llmlab.generate as gen
    import llmlab.model.decode as decode

    m = _model()
    seen = []
    real = decode.decode_weights
    monkeypatch.setattr(gen, "decode_weights", lambda model, keep, packed: seen.append(packed) or real(model, keep, packed))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    for rows in (1, 3, 4):
        out = generate_tokens(m, prompts[:rows], max_new_tokens=10, temperature=0).responses
        assert out[0] == _greedy_reference(m, prompts[0], 10)
    assert seen == [False, False, True]
    assert m.layers[0].mlp._decode_cache["gate_up_decode"][1].is_mkldnn  # kept for the next call (eval mode)


@pytest.mark.skipif(not linear_mod.onednn_ready(), reason="needs oneDNN")
def test_compile_with_four_rows_on_cpu_decodes_eagerly_packed(monkeypatch):
    m = _model()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    eager = generate_tokens(m, prompts, max_new_tokens=10, temperature=0).responses
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: pytest.fail("compiled a 4-row CPU decode"))
    assert generate_tokens(m, prompts, max_new_tokens=10, temperature=0, compile=True).responses == eager
