"""The gated MLP's CPU training function (llmlab.model.mlp.GatedMLPFunction): autograd's values and
gradients, one (tokens x d_ff) tensor fewer saved, and used exactly where it applies."""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import model_grads, tiny_config

import llmlab.model.linear as linear_mod
from llmlab.model import build_model
from llmlab.model.linear import onednn_ready
from llmlab.model.mlp import GatedMLP, GatedMLPFunction

pytestmark = pytest.mark.skipif(not onednn_ready(), reason="this torch build has no oneDNN inner product")


@pytest.fixture(autouse=True)
def _any_size(monkeypatch):
    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_MACS", 0)


def _reference(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _weights(d=24, f=40):
    torch.manual_seed(0)
    return [(torch.randn(*s) * 0.3).requires_grad_() for s in ((f, d), (f, d), (d, f))]


@pytest.mark.parametrize("x_grad", [True, False])
def test_values_and_gradients_equal_autograds(x_grad):
    weights = _weights()
    x = torch.randn(3, 5, 24, requires_grad=x_grad)
    g = torch.randn(3, 5, 24)
    wanted = [x, *weights] if x_grad else weights
    y = GatedMLPFunction.apply(x, *weights)
    assert type(y.grad_fn).__name__ == "GatedMLPFunctionBackward"
    y_ref = _reference(x, *weights)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(y_ref, wanted, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_weights_get_no_gradient():
    wg, wu, wd = _weights()
    wu.requires_grad_(False)
    x = torch.randn(4, 24, requires_grad=True)
    GatedMLPFunction.apply(x, wg, wu, wd).sum().backward()
    assert wu.grad is None and wg.grad is not None and wd.grad is not None and x.grad is not None


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_saves_one_hidden_sized_tensor_less_than_autograd():
    weights = _weights(d=24, f=40)
    x = torch.randn(6, 24, requires_grad=True)
    ours = _saved_bytes(lambda: GatedMLPFunction.apply(x, *weights))
    theirs = _saved_bytes(lambda: _reference(x, *weights))
    assert theirs - ours == 6 * 40 * 4  # silu(gate), recomputed in backward instead


def _uses_it(model, ids) -> bool:
    return any(type(n).__name__ == "GatedMLPFunctionBackward" for n in _graph(model(ids).sum().grad_fn))


def _graph(node, seen=None):
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return seen
    seen.add(node)
    for nxt, _ in node.next_functions:
        _graph(nxt, seen)
    return seen


def test_model_training_uses_it_and_matches_autograds_form(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_config(init_std=0.3)).train()
    ids = torch.randint(0, 128, (2, 16))
    assert _uses_it(model, ids)
    loss, g = model_grads(model, ids)
    monkeypatch.setattr(GatedMLP, "one_function", lambda self, x: False)
    assert not _uses_it(model, ids)
    loss_ref, g_ref = model_grads(model, ids)
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_not_used_without_gradients_with_onednn_off_or_under_lora(monkeypatch):
    from llmlab.config import SFTConfig
    from llmlab.lora import apply_lora

    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    ids = torch.randint(0, 128, (1, 8))
    calls = []
    real = GatedMLPFunction.apply
    monkeypatch.setattr(GatedMLPFunction, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        model(ids)
    assert not calls  # inference keeps the module path (and CPU decoding its fused weights)
    monkeypatch.setattr(linear_mod, "_onednn", lambda *a, **kw: False)
    model(ids)
    assert not calls  # LLMLAB_CPU_MATMUL=mkl, other dtypes, small products
    monkeypatch.undo()
    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(GatedMLPFunction, "apply", lambda *a: calls.append(1) or real(*a))
    lora = apply_lora(model, SFTConfig(use_lora=True, lora_preset="all", lora_r=4, lora_alpha=8), verbose=False)
    lora(ids).sum().backward()
    assert not calls  # PEFT's wrapped projections run their own forward
