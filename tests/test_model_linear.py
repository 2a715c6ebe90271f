"""The model's linear products on CPU (llmlab.model.linear.linear / matmul_t): oneDNN where it is there,
with F.linear's values and gradients, and F.linear wherever oneDNN does not apply."""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import model_grads, tiny_config

import llmlab.model.linear as linear_mod
from llmlab.model import build_model
from llmlab.model.linear import linear, matmul_t, onednn_ready

needs_onednn = pytest.mark.skipif(not onednn_ready(), reason="this torch build has no oneDNN inner product")


@pytest.fixture(autouse=True)
def _any_size(monkeypatch):
    """These tests' products are tiny: let them through to oneDNN (the size floor has its own test)."""
    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_MACS", 0)


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_linear_equals_f_linear_values_and_gradients(shape, bias, strided):
    x = torch.randn(*shape[:-1], 48)[..., ::2] if strided else torch.randn(shape)
    x.requires_grad_()
    w = torch.randn(16, 24, requires_grad=True)
    b = torch.randn(16, requires_grad=True) if bias else None
    g = torch.randn(*shape[:-1], 16)
    y = linear(x, w, b)
    assert type(y.grad_fn).__name__ == "_CPULinearBackward"  # the oneDNN path, not F.linear
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    y_ref = F.linear(x, w, b)
    refs = torch.autograd.grad(y_ref, [t for t in (x, w, b) if t is not None], g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), y_ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_frozen_weight_gets_no_gradient_and_the_input_still_does():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8)  # frozen (a LoRA base weight)
    y = linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 6) @ w)
    assert w.grad is None


def test_falls_back_to_f_linear_for_other_dtypes_and_when_turned_off(monkeypatch):
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert type(linear(x, w).grad_fn).__name__ != "_CPULinearBackward"
    monkeypatch.setenv("LLMLAB_CPU_MATMUL", "mkl")
    onednn_ready.cache_clear()
    try:
        assert not onednn_ready()
        x32, w32 = x.float(), w.float()
        assert type(linear(x32, w32).grad_fn).__name__ != "_CPULinearBackward"
        torch.testing.assert_close(matmul_t(x32, w32), F.linear(x32, w32))
    finally:
        monkeypatch.delenv("LLMLAB_CPU_MATMUL")
        onednn_ready.cache_clear()


@needs_onednn
def test_model_training_step_matches_the_mkl_path(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_config(init_std=0.3)).train()
    ids = torch.randint(0, 128, (2, 16))
    loss, g = model_grads(model, ids)
    monkeypatch.setattr(linear_mod, "_onednn", lambda *a, **kw: False)
    loss_ref, g_ref = model_grads(model, ids)
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_small_products_stay_on_mkl(monkeypatch):
    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_MACS", 1 << 24)
    w = torch.randn(96, 96, requires_grad=True)
    small, large = torch.randn(1024, 96), torch.randn(2048, 96)  # 2^23.2 and 2^24.2 multiply-adds
    assert type(linear(small, w).grad_fn).__name__ != "_CPULinearBackward"
    assert type(linear(large, w).grad_fn).__name__ == "_CPULinearBackward"



@needs_onednn
def test_lora_training_through_onednn_matches_mkl(monkeypatch):
    """PEFT wraps the model's Linear: the frozen base product runs on oneDNN, the adapters on top."""
    from llmlab.config import SFTConfig
    from llmlab.lora import apply_lora

    torch.manual_seed(0)
    model = apply_lora(build_model(tiny_config(init_std=0.3)),
                       SFTConfig(use_lora=True, lora_preset="all", lora_r=4, lora_alpha=8, lora_dropout=0.0), verbose=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero B: the adapter's path reaches the loss
    ids = torch.randint(0, 128, (2, 16))
    calls = []
    real = linear_mod._CPULinear.apply
    monkeypatch.setattr(linear_mod._CPULinear, "apply", lambda *a: calls.append(1) or real(*a))

    def lora_grads():
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    g = lora_grads()
    assert calls  # the base products went through oneDNN
    monkeypatch.setattr(linear_mod, "_onednn", lambda *a, **kw: False)
    g_ref = lora_grads()
    assert g.keys() == g_ref.keys() and g
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-5)


def test_an_unknown_cpu_matmul_choice_is_a_one_line_error(monkeypatch):
    from llmlab.errors import ConfigError

    monkeypatch.setenv("LLMLAB_CPU_MATMUL", "blas")
    onednn_ready.cache_clear()
    try:
        with pytest.raises(ConfigError, match="LLMLAB_CPU_MATMUL: expected 'onednn' or 'mkl', got 'blas'"):
            linear(torch.randn(2, 4), torch.randn(3, 4))
    finally:
        monkeypatch.delenv("LLMLAB_CPU_MATMUL")
        onednn_ready.cache_clear()


@needs_onednn
def test_compiled_training_keeps_the_onednn_products_as_one_op(monkeypatch):
    """Under torch.compile the products are the `llmlab::onednn_linear` op in the forward and the
    backward graphs (inductor would otherwise lower them to MKL's mm), with eager's loss and gradients."""
    from torch._dynamo.backends.common import aot_autograd

    from llmlab.train.loop import LMLoss

    graphs: list = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm

    torch.manual_seed(0)
    model = build_model(tiny_config(init_std=0.3)).train()
    loss_module = LMLoss(model)
    ids = torch.randint(0, 128, (2, 16))

    def grads(module):
        model.zero_grad()
        loss = module(ids, ids)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_ref, g_ref = grads(loss_module)
    torch._dynamo.reset()
    loss, g = grads(torch.compile(loss_module, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True))
    torch._dynamo.reset()
    forward, backward = (str(gm.code) for gm in graphs)
    n_linear = sum(isinstance(m, linear_mod.Linear) for m in model.modules())  # the blocks' projections
    assert forward.count("llmlab.onednn_linear") == n_linear + 2  # + the head's logits and input gradient
    assert backward.count("llmlab.onednn_linear") == n_linear  # the projections' input gradients
    assert "aten.mm" in backward  # the weight gradients stay on MKL
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_onednn_is_ready_wherever_mkldnn_is_available(monkeypatch):
    """The oneDNN tests above skip when onednn_ready() is False; a wrong product (the self-check failing)
    must not hide as a skip: with oneDNN built in and no override, it is ready."""
    monkeypatch.delenv("LLMLAB_CPU_MATMUL", raising=False)
    onednn_ready.cache_clear()
    try:
        assert onednn_ready() is True
    finally:
        onednn_ready.cache_clear()


@pytest.mark.parametrize("shape", [(70, 64), (5, 96), (33, 40)])
def test_transposed_is_a_contiguous_transpose(shape):
    x = torch.randn(shape)
    for src in (x, torch.randn(shape[1], shape[0]).t()):  # contiguous, and a strided view (plain copy)
        y = linear_mod.transposed(src)
        assert y.is_contiguous() and torch.equal(y, src.t())
