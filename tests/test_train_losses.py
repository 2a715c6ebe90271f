"""Chunked causal-LM cross entropy: same value and gradients as the plain loss, -100 ignored, any head."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.train.losses import (
    causal_lm_loss,
    chunked_lm_loss,
    count_label_tokens,
    label_rows,
    linear_cross_entropy,
    shift_labels,
    token_logprobs,
)

B, T, D, V = 3, 9, 16, 50


def reference(hidden, head, labels):
    """The plain loss: full logits, shift, F.cross_entropy(sum, ignore_index=-100)."""
    logits = head(hidden)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels[:, 1:].reshape(-1),
                           reduction="sum", ignore_index=-100)


def make(dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    head = nn.Linear(D, V, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g, dtype=dtype))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[2, -2:] = -100  # padding
    return hidden, head, labels


def grads_of(loss, hidden, head):
    loss.backward()
    out = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if head.bias is not None else [])
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_plain_value_and_gradients(dtype, tol, chunk_rows, bias):
    hidden, head, labels = make(dtype, bias)
    loss, n = causal_lm_loss(hidden, head, labels, chunk_rows=chunk_rows)
    got = grads_of(loss * 0.37, hidden, head)  # a non-unit upstream gradient must be applied
    ref = reference(hidden, head, labels)
    want = grads_of(ref * 0.37, hidden, head)
    assert n.item() == int((labels[:, 1:] != -100).sum()) == B * (T - 1) - 4 - 2
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b.to(a.dtype), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("plain_head", [True, False])
def test_rows_run_the_head_on_the_counted_positions_only(plain_head, monkeypatch):
    """`rows=label_rows(labels)`: the same loss and gradients, with the head's products over the counted
    rows alone (a spy counts the rows that reach it)."""
    import llmlab.train.losses as losses

    hidden, head, labels = make(torch.float64, bias=True)
    labels[1, :6] = -100  # another prompt: 4 + 5 + 2 skipped, with each row's last position 14 of 27
    if not plain_head:  # a head that is not exactly nn.Linear (LoRA, say): the checkpointed path
        wrapped = type("Wrapped", (nn.Linear,), {})(D, V, bias=True).double()
        wrapped.load_state_dict(head.state_dict())
        head = wrapped
    seen = []
    for name in ("linear_cross_entropy", "checkpointed_cross_entropy"):
        real = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda x, *a, real=real, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    rows = label_rows(labels)
    assert rows is not None and rows.tolist() == shift_labels(labels).reshape(-1).ne(-100).nonzero().squeeze(1).tolist()
    loss, n = causal_lm_loss(hidden, head, labels, rows=rows)
    got = grads_of(loss * 0.37, hidden, head)
    ref, _ = causal_lm_loss(hidden, head, labels)
    want = grads_of(ref * 0.37, hidden, head)
    assert seen == [n.item(), B * T] and n.item() == B * T - 14
    assert abs(loss.item() - ref.item()) <= 1e-12 * abs(ref.item())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_label_rows_keeps_every_row_when_few_are_skipped_or_the_labels_are_on_a_device():
    labels = torch.randint(0, V, (4, 64))  # pretraining: only each sequence's last position is skipped
    assert label_rows(labels) is None
    labels[:, :8] = -100  # 7 + 1 of 64 positions skipped (position t predicts label t + 1): 12.5 %
    assert label_rows(labels).numel() == 4 * (64 - 8)
    labels[:, :] = -100  # nothing counts: every row (the loss keeps its zero gradient)
    assert label_rows(labels) is None
    assert label_rows(torch.full((2, 8), -100, device="meta")) is None  # would wait for the device


def test_ignored_positions_contribute_nothing():
    hidden, head, labels = make(torch.float64)
    loss, _ = causal_lm_loss(hidden, head, labels, chunk_rows=5)
    loss.backward()
    # position t predicts labels[t+1]: rows 0..3 of sequence 0 (targets labels[0, 1:5] == -100) and the last
    # position of every sequence have zero gradient; changing those labels changes nothing
    assert hidden.grad[0, :4].abs().max() == 0
    assert hidden.grad[:, -1].abs().max() == 0
    assert hidden.grad[1, :-1].abs().amax(-1).min() > 0
    other = labels.clone()
    other[0, :5] = torch.arange(5)
    assert not torch.equal(causal_lm_loss(hidden, head, other)[0], loss)  # they would count if not ignored


@pytest.mark.parametrize("plain_head", [True, False])
def test_no_rows_give_a_zero_loss_that_backward_still_runs_through(plain_head):
    """rows= with nothing in it (a micro-batch whose labels are all -100): zero loss, zero gradients, no
    error from backward (under DDP one rank failing would leave the others waiting)."""
    hidden, head, labels = make(torch.float32)
    if not plain_head:
        wrapped = type("Wrapped", (nn.Linear,), {})(D, V, bias=False)
        wrapped.load_state_dict(head.state_dict())
        head = wrapped
    loss, _ = causal_lm_loss(hidden, head, labels, rows=torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0
    assert all(g.abs().sum() == 0 for g in grads_of(loss, hidden, head))


def test_all_ignored_gives_zero_loss_and_zero_grad():
    hidden, head, labels = make(torch.float32)
    labels[:] = -100
    loss, n = causal_lm_loss(hidden, head, labels, chunk_rows=4)
    loss.backward()
    assert loss.item() == 0 and n.item() == 0
    assert hidden.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0


def test_any_head_module_goes_through_checkpointed_chunks():
    """A head that is not a plain nn.Linear (as a LoRA-wrapped lm_head is) gets the same numbers."""

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.extra = nn.Parameter(torch.zeros(V, dtype=torch.float64))

        def forward(self, x):
            return self.inner(x) + self.extra

    hidden, head, labels = make(torch.float64)
    wrapped = Wrapped(head)
    loss, _ = causal_lm_loss(hidden, wrapped, labels, chunk_rows=4)
    got = grads_of(loss, hidden, head)
    ref = reference(hidden, wrapped, labels)
    want = grads_of(ref, hidden, head)
    assert abs(loss.item() - ref.item()) < 1e-10
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_tied_weight_receives_both_gradients():
    emb = nn.Embedding(V, D).double()
    head = nn.Linear(D, V, bias=False).double()
    head.weight = emb.weight
    ids = torch.randint(0, V, (B, T))
    loss = chunked_lm_loss(head, emb(ids), ids, chunk_rows=3)
    loss.backward()
    got = emb.weight.grad.clone()
    emb.weight.grad = None
    ref = F.cross_entropy(head(emb(ids))[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(got, emb.weight.grad)
    assert abs(loss.item() - ref.item()) < 1e-12


def test_no_grad_path_and_helpers():
    hidden, head, labels = make(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.reshape(-1, D), head.weight, None, shift_labels(labels).reshape(-1),
                                    chunk_rows=6)
    assert not loss.requires_grad
    assert abs(loss.item() - reference(hidden, head, labels).item()) < 1e-3
    assert shift_labels(labels)[:, -1].eq(-100).all() and torch.equal(shift_labels(labels)[:, :-1], labels[:, 1:])
    assert count_label_tokens(labels).item() == int((labels[:, 1:] != -100).sum())


def test_chunked_gnb_loss_matches_sophias_estimator_and_replays_its_samples():
    from llmlab.optim import gnb_sampled_loss
    from llmlab.train.losses import _gnb_chunk, chunked_gnb_loss

    hidden, head, labels = make(torch.float64)
    mask = shift_labels(labels) != -100

    def run(fn):
        torch.manual_seed(5)
        loss = fn()
        return [loss.detach()] + grads_of(loss, hidden, head)

    # one chunk: exactly Sophia's gnb_sampled_loss over the full logits
    one = run(lambda: chunked_gnb_loss(hidden, head, labels, chunk_rows=10_000))
    full = run(lambda: gnb_sampled_loss(head(hidden), mask))
    for a, b in zip(one, full):
        torch.testing.assert_close(a, b)

    # several checkpointed chunks: backward recomputes with the labels forward sampled (RNG replayed)
    def by_hand():
        x, m = hidden.reshape(-1, D), mask.reshape(-1)
        total = sum(_gnb_chunk(head, x[i:i + 4], m[i:i + 4]) for i in range(0, x.shape[0], 4))
        return total / m.sum()

    chunked = run(lambda: chunked_gnb_loss(hidden, head, labels, chunk_rows=4))
    plain = run(by_hand)
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b)
    torch.manual_seed(6)  # other samples give another gradient: the comparisons above can tell
    other = chunked_gnb_loss(hidden, head, labels, chunk_rows=4)
    assert not torch.equal(grads_of(other, hidden, head)[0], chunked[1])


def test_gnb_rows_loss_is_sophias_estimator_on_the_given_rows_at_temperature():
    """RLHF's Hessian estimate: the GNB loss of head(x) / T over every row given (the scored response
    positions); its chunks are chunked_gnb_loss's (checkpointed, samples replayed: tested above)."""
    from llmlab.optim import gnb_sampled_loss
    from llmlab.train.losses import gnb_rows_loss

    hidden, head, _ = make(torch.float64)
    x = hidden.reshape(-1, D)[3:20]

    def run(fn):
        torch.manual_seed(5)
        loss = fn()
        return [loss.detach()] + grads_of(loss, hidden, head)

    want = run(lambda: gnb_sampled_loss(head(x) / 0.7))
    for a, b in zip(run(lambda: gnb_rows_loss(x, head, temperature=0.7, chunk_rows=10_000)), want):
        torch.testing.assert_close(a, b)
    hot = run(lambda: gnb_rows_loss(x, head, chunk_rows=10_000))  # temperature 1: other logits, other loss
    assert abs(hot[0].item() - want[0].item()) > 1e-3
    none = gnb_rows_loss(x[:0], head)  # a batch with nothing scored: zero, and backward still runs
    assert none.item() == 0 and all(g.abs().sum() == 0 for g in grads_of(none, hidden, head))


# --- token_logprobs: what RLHF scores responses with ---------------------------------------------


def test_token_logprobs_by_hand_and_bf16_is_upcast():
    # an identity head: the rows are the logits. V = 2: [0, 0] -> p = 1/2 each; [ln 3, 0] -> 3/4, 1/4
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, 0.0], [ln3, 0.0], [ln3, 0.0]])
    got = token_logprobs(logits, nn.Identity(), torch.tensor([1, 0, 1]))
    torch.testing.assert_close(got, torch.tensor([-math.log(2.0), math.log(0.75), math.log(0.25)]))
    # temperature 2 halves the logits: [ln 3 / 2, 0] -> p(0) = sqrt(3) / (sqrt(3) + 1)
    hot = token_logprobs(logits[1:2], nn.Identity(), torch.tensor([0]), temperature=2.0)
    torch.testing.assert_close(hot, torch.tensor([math.log(math.sqrt(3) / (math.sqrt(3) + 1))]))
    g = torch.Generator().manual_seed(0)
    x, tok = torch.randn(7, 11, generator=g), torch.randint(0, 11, (7,), generator=g)
    low = token_logprobs(x.bfloat16(), nn.Identity(), tok)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, torch.log_softmax(x.bfloat16().float(), -1).gather(-1, tok[:, None]).squeeze(1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_in_chunks_equal_the_full_logits_and_hold_one_chunk(temperature):
    """Chunked (3 rows, checkpointed) = one pass over the full logits, values and gradients; the head
    never sees more than one chunk, in forward or in backward's recomputation."""
    hidden, head, labels = make(torch.float64, bias=True)
    x, t = hidden.reshape(-1, D), labels.reshape(-1).clamp(min=0)
    seen = []
    head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    got = token_logprobs(x, head, t, temperature=temperature, chunk_rows=3)
    g = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(1))
    ga = grads_of((got * g).sum(), hidden, head)
    assert max(seen) == 3 and len(seen) == 2 * math.ceil(x.shape[0] / 3)  # forward, then recomputed
    want = torch.log_softmax(head(x) / temperature, -1).gather(-1, t[:, None]).squeeze(1)
    gb = grads_of((want * g).sum(), hidden, head)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_default_chunk_follows_the_device_budget(device, monkeypatch):
    """With no chunk_rows the fused loss chunks by CHUNK_BYTES of fp32 logits on the CPU, in at most
    CPU_MAX_CHUNK_ROWS rows (smaller chunks measured faster there), and by CUDA_CHUNK_BYTES on CUDA (larger
    chunks measured faster there)."""
    from llmlab.train import losses

    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 64 * 8)  # 8 rows of vocab 64
    monkeypatch.setattr(losses, "CUDA_CHUNK_BYTES", 4 * 64 * 16)
    monkeypatch.setattr(losses, "MIN_CHUNK_ROWS", 1)
    seen = []
    real = losses._LinearCrossEntropy.apply
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda *a: seen.append(a[4]) or real(*a))
    x = torch.randn(40, 16, device=device)
    w = torch.randn(64, 16, device=device)
    t = torch.randint(0, 64, (40,), device=device)
    got = losses.linear_cross_entropy(x, w, None, t)
    assert seen == [16 if device == "cuda" else 8]
    torch.testing.assert_close(got, F.cross_entropy(x @ w.t(), t, reduction="sum"), rtol=1e-4, atol=1e-3)
    monkeypatch.setattr(losses, "CPU_MAX_CHUNK_ROWS", 5)
    losses.linear_cross_entropy(x, w, None, t)
    assert seen[-1] == (16 if device == "cuda" else 5)


def test_cuda_chunk_budget_follows_the_card_memory(monkeypatch):
    """1/64 of the card's memory, between CHUNK_BYTES and CUDA_CHUNK_BYTES: a 16 GiB card keeps the CPU's
    256 MiB, a 40 GiB one gets 640 MiB, an 80 GiB one 1 GiB; the CPU always CHUNK_BYTES."""
    from llmlab.train import losses

    for gib, want in ((16, 256), (40, 640), (80, 1024), (141, 1024)):
        monkeypatch.setattr(losses, "_cuda_memory", lambda index, gib=gib: gib * 2**30)
        assert losses.chunk_budget(torch.device("cuda", 0)) == want * 2**20, gib
    assert losses.chunk_budget(torch.device("cpu")) == losses.CHUNK_BYTES
