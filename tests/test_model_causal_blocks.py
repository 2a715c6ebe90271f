"""Block-causal CPU attention (llmlab.model.causal_blocks): the same outputs and gradients as SDPA's
causal attention, used by the model exactly where it should be."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import model_grads, tiny_config

from llmlab.model import build_model
from llmlab.model.causal_blocks import block_causal_attention, rows_for


def _qkv(B, H, Hkv, T, hd):
    # laid out as the model's projections are: (B, T, heads, hd) seen as (B, heads, T, hd)
    def one(h):
        return (torch.randn(B, T, h, hd) * 2).transpose(1, 2).requires_grad_()
    return one(H), one(Hkv), one(Hkv)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("T,rows", [(256, 32), (256, 64), (96, 32), (40, 32), (40, 7), (8, 64)])
def test_equals_sdpa_causal_outputs_and_gradients(H, Hkv, T, rows):
    q, k, v = _qkv(2, H, Hkv, T, 8)
    g = torch.randn(2, H, T, 8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    out = block_causal_attention(q, k, v, rows)
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)
    # not causal would differ: the test sees the masking
    full = F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H)
    assert (full - out).abs().max() > 1e-2


def test_rows_follow_the_measured_range():
    assert [rows_for(t, 3) for t in (64, 127, 128, 256, 300, 512, 513, 1024)] == [0, 0, 32, 32, 32, 32, 0, 0]
    assert rows_for(256, 1) == 64  # without GQA a block's product would have only 32 rows


def test_only_needed_gradients():
    q, k, v = _qkv(1, 4, 2, 64, 8)
    k = k.detach()
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum(), (q, v))
    out = block_causal_attention(q, k, v, 32)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, v)), ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)


def _uses_blocks(model, ids, grad: bool = True) -> bool:
    """Whether a forward of `model` on `ids` ran the blocked attention (seen in the autograd graph, or
    by a counting wrapper without gradients)."""
    import llmlab.model.attention as attention

    calls = []
    real = attention.block_causal_attention
    attention.block_causal_attention = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.set_grad_enabled(grad):
            model(ids)
    finally:
        attention.block_causal_attention = real
    return bool(calls)


def _blocked_model(batch: int):
    """A tiny model in training mode and a 256-token batch that goes through the blocked attention."""
    torch.manual_seed(0)
    model = build_model(tiny_config(max_seq_len=256, init_std=0.3)).train()
    ids = torch.randint(0, 128, (batch, 256))
    assert _uses_blocks(model, ids)
    return model, ids


def test_model_training_uses_it_and_matches_plain_attention():
    model, ids = _blocked_model(2)
    loss, grads = model_grads(model, ids)
    plain = model.attention_mask
    model.attention_mask = lambda *a, **kw: dataclasses.replace(plain(*a, **kw), block_rows=0)
    assert not _uses_blocks(model, ids)
    loss_ref, grads_ref = model_grads(model, ids)
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_not_used_without_gradients_with_dropout_or_at_other_lengths():
    torch.manual_seed(0)
    model = build_model(tiny_config(max_seq_len=256)).train()
    assert not _uses_blocks(model, torch.randint(0, 128, (1, 64)))  # outside 128..512
    assert _uses_blocks(model, torch.randint(0, 128, (1, 256)))
    assert not _uses_blocks(model, torch.randint(0, 128, (1, 256)), grad=False)  # inference: no gain
    dropped = build_model(tiny_config(max_seq_len=256, dropout=0.1)).train()
    assert not _uses_blocks(dropped, torch.randint(0, 128, (1, 256)))
    assert _uses_blocks(dropped.eval(), torch.randint(0, 128, (1, 256)))  # eval: dropout is off


def test_gradient_checkpointing_recomputes_it_exactly():
    model, ids = _blocked_model(1)
    loss, grads = model_grads(model, ids)
    model.gradient_checkpointing = True
    import llmlab.model.attention as attention

    calls, real = [], attention.block_causal_attention
    attention.block_causal_attention = lambda *a: calls.append(1) or real(*a)
    try:
        loss_ckpt, grads_ckpt = model_grads(model, ids)
    finally:
        attention.block_causal_attention = real
    assert len(calls) == 2 * len(model.layers)  # the blocked attention ran again in backward (recomputed)
    torch.testing.assert_close(loss, loss_ckpt)
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b)
