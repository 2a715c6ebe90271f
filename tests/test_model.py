"""The transformer: causality, windows, positions, parameter counts, gradients, config validation."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_config

from llmlab.config import ModelConfig
from llmlab.errors import ConfigError
from llmlab.model import build_model
from llmlab.model.estimate import count_parameters, estimate_memory
from llmlab.model.positions import alibi_slopes, rope_inv_freq, yarn_inv_freq

PES = ["sinusoidal", "rope", "alibi", "yarn"]
ATTN = ["mha", "mqa", "gqa"]


def _model(**kw):
    torch.manual_seed(0)
    kw.setdefault("init_std", 0.3)  # large weights make every dependency visible well above float noise
    return build_model(tiny_config(**kw)).eval()


@pytest.mark.parametrize("pe,attn,window", list(itertools.product(PES, ATTN, [None, 3])))
def test_causal_for_every_position_attention_and_window(pe, attn, window):
    m = _model(positional_encoding=pe, attention_type=attn, sliding_window=window,
               rope_scaling_factor=2.0 if pe == "yarn" else 1.0)
    x = torch.randint(0, 128, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("norm,act", list(itertools.product(["layernorm", "rmsnorm"],
                                                             ["relu", "gelu", "silu", "leaky_relu", "swiglu"])))
def test_causal_and_counted_for_every_norm_and_activation(norm, act):
    cfg = tiny_config(norm_type=norm, activation=act, attention_bias=True, init_std=0.3)
    m = build_model(cfg).eval()
    assert sum(p.numel() for p in m.parameters()) == count_parameters(cfg)
    x = torch.randint(0, 128, (1, 10))
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % 128
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :6], m(y)[:, :6], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pe", PES)
def test_sliding_window_hides_tokens_beyond_it(pe):
    w = 4
    m = _model(positional_encoding=pe, sliding_window=w, n_layers=1, rope_scaling_factor=2.0 if pe == "yarn" else 1.0)
    x = torch.randint(0, 128, (1, 12))
    y = x.clone()
    y[0, 12 - 1 - w] = (y[0, 12 - 1 - w] + 5) % 128  # one step outside the last token's window
    z = x.clone()
    z[0, 12 - w] = (z[0, 12 - w] + 5) % 128  # the oldest token inside the window
    with torch.no_grad():
        base, outside, inside = m(x)[0, -1], m(y)[0, -1], m(z)[0, -1]
    torch.testing.assert_close(base, outside, atol=1e-5, rtol=0)
    assert (base - inside).abs().max() > 1e-4


@pytest.mark.parametrize("pe", PES)
def test_position_encoding_makes_order_matter(pe):
    m = _model(positional_encoding=pe, rope_scaling_factor=2.0 if pe == "yarn" else 1.0, n_layers=1)
    x = torch.randint(0, 128, (1, 10))
    perm = torch.cat([torch.randperm(9), torch.tensor([9])])
    with torch.no_grad():
        a, b = m(x)[0, -1], m(x[:, perm])[0, -1]
    assert (a - b).abs().max() > 1e-4


def test_no_position_signal_would_be_order_blind():
    """Control for the test above: one causal attention layer without positions is blind to the order of
    the tokens before the last one, so the test above measures the encodings themselves."""
    m = _model(positional_encoding="rope", n_layers=1)
    for layer in m.layers:
        layer.self_attn.positions.inv_freq.zero_()  # RoPE with zero frequencies = no positions
    x = torch.randint(0, 128, (1, 10))
    perm = torch.cat([torch.randperm(9), torch.tensor([9])])
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0, -1], m(x[:, perm])[0, -1], atol=1e-5, rtol=0)


def test_yarn_with_factor_one_is_refused_and_differs_from_rope_otherwise():
    # Factor 1 would be exactly RoPE (same frequencies, no temperature), so a yarn config must extend.
    as_rope = SimpleNamespace(head_dim=8, rope_theta=10000.0, rope_scaling_factor=1.0, yarn_original_len=64,
                              yarn_beta_fast=32.0, yarn_beta_slow=1.0)
    freqs, attn_factor = yarn_inv_freq(as_rope)
    torch.testing.assert_close(freqs, rope_inv_freq(8, 10000.0))
    assert attn_factor == 1.0
    for factor in (1.0, 1):
        with pytest.raises(ConfigError) as e:
            tiny_config(positional_encoding="yarn", rope_scaling_factor=factor)
        message = str(e.value)
        assert message.startswith("rope_scaling_factor: positional_encoding=yarn with rope_scaling_factor=1")
        assert "set rope_scaling_factor > 1 (e.g. 4 for 4x the trained context)" in message
        assert "or use positional_encoding=rope" in message and "\n" not in message
    assert tiny_config(positional_encoding="rope", rope_scaling_factor=1.0).positional_encoding == "rope"

    torch.manual_seed(0)
    rope = build_model(tiny_config(positional_encoding="rope", init_std=0.3))
    yarn4 = build_model(tiny_config(positional_encoding="yarn", rope_scaling_factor=4.0, original_max_seq_len=16,
                                    init_std=0.3))
    yarn4.load_state_dict(rope.state_dict())
    x = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        assert (rope(x) - yarn4(x)).abs().max() > 1e-3
    # YaRN keeps high frequencies and stretches low ones by the factor
    f_rope, f_yarn = rope.positions.inv_freq, yarn4.positions.inv_freq
    assert torch.isclose(f_yarn[0], f_rope[0])
    assert torch.isclose(f_yarn[-1], f_rope[-1] / 4)
    assert yarn4.positions.attn_factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)


def test_alibi_attention_is_the_hand_computed_biased_softmax():
    """One alibi layer's attention equals softmax(q k^T / sqrt(d) - slope_h (i - j), causal) v, GQA heads
    sharing their group's k and v."""
    m = _model(positional_encoding="alibi", n_layers=1)
    attn = m.layers[0].self_attn
    seen = {}
    attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    x_ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        m(x_ids)
        h = seen["x"]  # the normed input of the attention, (B, T, D)
        B, T, _ = h.shape
        H, Hkv, hd = 4, 2, 8
        q = F.linear(h, attn.q_proj.weight).view(B, T, H, hd).transpose(1, 2)
        k = F.linear(h, attn.k_proj.weight).view(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        v = F.linear(h, attn.v_proj.weight).view(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        slopes = alibi_slopes(H)  # 2^-2, 2^-4, 2^-6, 2^-8 for four heads
        torch.testing.assert_close(slopes, torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) - slopes[:, None, None] * (i - j).float()
        scores = scores.masked_fill(j > i, float("-inf"))
        heads = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
        torch.testing.assert_close(seen["out"], F.linear(heads, attn.o_proj.weight), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "leaky_relu"])
def test_each_plain_activation_is_the_one_applied(act):
    """mlp(x) == down(act(up(x))) with the named function, and not with any of the others."""
    fns = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "leaky_relu": F.leaky_relu}
    m = _model(activation=act)
    mlp = m.layers[0].mlp
    assert not hasattr(mlp, "gate_proj")  # ungated: up -> act -> down
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = mlp(x)
        up = F.linear(x, mlp.up_proj.weight)
        expected = {name: F.linear(fn(up), mlp.down_proj.weight) for name, fn in fns.items()}
    torch.testing.assert_close(out, expected[act], atol=1e-6, rtol=1e-6)
    for other, y in expected.items():
        if other != act:
            assert (out - y).abs().max() > 1e-3, other


def test_swiglu_is_gated():
    m = _model(activation="swiglu")
    mlp = m.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                            mlp.down_proj.weight)
        torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-6)


def test_dropout_acts_in_training_only_and_zero_is_off():
    x = torch.randint(0, 128, (2, 12))
    m = _model(dropout=0.1)
    m.train()
    with torch.no_grad():
        a, b = m(x), m(x)
    assert (a - b).abs().max() > 1e-3  # a fresh mask each forward
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)
        evaluated = m(x)
    off = _model(dropout=0.0)
    off.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(off.eval()(x), evaluated, atol=1e-6, rtol=1e-6)  # eval ignores the rate
        trained = off.train()(x)
    torch.testing.assert_close(trained, off.eval()(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_eps_reaches_every_norm_and_changes_the_output(norm):
    small, big = _model(norm_type=norm), _model(norm_type=norm, norm_eps=0.5)
    big.load_state_dict(small.state_dict())
    norms = [mod for name, mod in big.named_modules() if name.endswith(("layernorm", "norm"))]
    assert len(norms) == 2 * 2 + 1  # two per block, one final
    assert all(mod.eps == 0.5 for mod in norms)
    assert all(mod.eps == 1e-6 for name, mod in small.named_modules() if name.endswith(("layernorm", "norm")))
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert (small(x) - big(x)).abs().max() > 1e-2
        h = torch.randn(3, 32)
        y = big.norm(h)
        if norm == "rmsnorm":
            expected = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 0.5) * big.norm.weight
        else:
            expected = F.layer_norm(h, (32,), big.norm.weight, big.norm.bias, eps=0.5)
        torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("needs", ["both", "x", "weight"])
def test_rmsnorm_hand_backward_equals_f_rms_norm_in_values_and_gradients(needs):
    """Differentiated on CPU, RMSNorm runs `_RMSNormFunction` (its own backward); it must give
    `F.rms_norm`'s output and gradients, for the input, the weight, or both."""
    from llmlab.model.norms import RMSNorm
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(2, 5, 48, generator=g) * 3, torch.rand(48, generator=g) + 0.5
    upstream = torch.randn(2, 5, 48, generator=g)

    def run(ours: bool):
        x = x0.clone().requires_grad_(needs != "weight")
        norm = RMSNorm(48, eps=0.1)
        norm.weight = torch.nn.Parameter(w0.clone(), requires_grad=needs != "x")
        y = norm(x) if ours else F.rms_norm(x, (48,), norm.weight, 0.1)
        y.backward(upstream)
        return y, x.grad, norm.weight.grad, type(y.grad_fn).__name__

    y, gx, gw, fn = run(ours=True)
    y_ref, gx_ref, gw_ref, _ = run(ours=False)
    assert fn == "_RMSNormFunctionBackward"  # the hand-written backward ran
    torch.testing.assert_close(y, y_ref)
    for mine, ref in ((gx, gx_ref), (gw, gw_ref)):
        assert (mine is None) == (ref is None)
        if ref is not None:
            assert ref.abs().max() > 1e-2
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    norm = RMSNorm(48, eps=0.1)
    with torch.no_grad():  # not differentiated: F.rms_norm itself
        assert norm(x0).grad_fn is None
        torch.testing.assert_close(norm(x0), F.rms_norm(x0, (48,), norm.weight, 0.1))


def test_alibi_slopes_match_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2 ** -(i + 1) for i in range(8)]))
    s = alibi_slopes(6)  # not a power of two: 4 from the 4-head set + 2 interleaved from the 8-head set
    torch.testing.assert_close(s[:4], alibi_slopes(4))
    torch.testing.assert_close(s[4:], alibi_slopes(8)[0::2][:2])


@pytest.mark.parametrize("kw", [
    {}, {"tie_embeddings": True}, {"attention_type": "mha"}, {"attention_type": "mqa"},
    {"activation": "gelu", "norm_type": "layernorm"}, {"attention_bias": True},
])
def test_every_parameter_gets_a_gradient_and_count_is_exact(kw):
    cfg = tiny_config(**kw)
    m = build_model(cfg)
    assert sum(p.numel() for p in m.parameters()) == count_parameters(cfg)
    x = torch.randint(0, 128, (2, 9))
    logits = m(x)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_spec_default_config_counts_without_building():
    cfg = ModelConfig()
    n = count_parameters(cfg)
    assert 400e6 < n < 700e6  # Qwen2.5-0.5B-like shape with untied head
    est = estimate_memory(cfg, batch_size=1, optimizer="adamw")
    lora = estimate_memory(cfg, batch_size=1, optimizer="adamw", lora_preset="minimal")
    assert est.optimizer_gb == pytest.approx(n * 8 / 1024**3)
    assert lora.trainable < n / 100 and lora.total_gb < est.total_gb
    assert estimate_memory(cfg, optimizer="lion").optimizer_gb == pytest.approx(est.optimizer_gb / 2)
    assert estimate_memory(cfg, dtype="bf16").activations_gb < est.activations_gb


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = build_model(tiny_config())
    x = torch.randint(0, 128, (2, 9))
    m(x).sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in m.layers]
    m(x).sum().backward()
    assert len(calls) == 2 * len(m.layers)  # each block started again in backward: it was recomputed
    for a, p in zip(g1, m.parameters()):
        torch.testing.assert_close(a, p.grad)
    calls.clear()
    m.eval()(x).sum().backward()  # eval: no checkpointing, one forward per block
    assert len(calls) == len(m.layers)
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("kw,fragment", [
    ({"d_model": 30}, "d_model"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"positional_encoding": "learned"}, "positional_encoding"),
    ({"dropout": 1.5}, "dropout"),
    ({"n_layers": 0}, "n_layers"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"d_model": "big"}, "d_model"),
])
def test_config_errors_name_the_field(kw, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        tiny_config(**kw)
    assert "\n" not in str(e.value)


def test_mha_and_mqa_fix_kv_heads_and_json_round_trip(tmp_path):
    assert tiny_config(attention_type="mha").n_kv_heads == 4
    assert tiny_config(attention_type="mqa").n_kv_heads == 1
    cfg = tiny_config(positional_encoding="alibi", sliding_window=8)
    cfg.save(tmp_path / "m.json")
    assert ModelConfig.load(tmp_path / "m.json") == cfg
    (tmp_path / "bad.json").write_text('{"d_model": 32, "n_head": 4}')
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.load(tmp_path / "bad.json")
    assert cfg.with_overrides(["n_layers=3", "sliding_window=null"]).n_layers == 3
    with pytest.raises(ConfigError, match="nlayers"):
        cfg.with_overrides(["nlayers=3"])


def test_bf16_weights_on_cpu_match_fp32_within_bf16_tolerance():
    """bf16 weights run the model's bf16 paths (RMSNorm upcasts, scales by its bf16 weight), which CPU
    autocast never reaches: logits stay within bf16 rounding of fp32's. Random norm weights make a
    norm that drops or misapplies its weight visible."""
    torch.manual_seed(0)
    m = build_model(tiny_config(init_std=0.2)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    x = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        want = m(x)
        got = m.to(torch.bfloat16)(x)
    assert got.dtype == torch.bfloat16
    scale = float(want.abs().max())
    err = float((got.float() - want).abs().max())
    assert scale > 1 and err < 0.03 * scale, (err, scale)  # 0.07 of 4.5 here; a norm without its weight: 2.9
