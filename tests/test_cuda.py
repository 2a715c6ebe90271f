"""CUDA paths (skipped without a GPU; run on a lent GPU by the lead): bf16 autocast forward, cached
generation, and each stage's entry point on the GPU with automatic device choice."""

import json
import os

import pytest
import torch
from tests.conftest import tiny_config

from llmlab.config import ModelConfig, RLHFConfig, SFTConfig, TrainConfig
from llmlab.generate import generate_tokens
from llmlab.model import build_model

# LLMLAB_STAGE_TESTS_ON_CPU=1 runs the stage tests here too (dry run before a GPU session)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("LLMLAB_STAGE_TESTS_ON_CPU"),
                                reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from llmlab.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(["bundled:shakespeare", "bundled:sft"], vocab_size=512, out_dir=str(out), max_docs=800)
    return str(out)


def test_bf16_autocast_forward_close_to_fp32_and_flash_causal():
    m = build_model(tiny_config(d_model=64, n_heads=4, max_seq_len=128)).cuda().eval()
    x = torch.randint(0, 128, (4, 96), device="cuda")
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = m(x)
    assert got.dtype == torch.bfloat16
    assert (ref - got.float()).abs().max() < 0.05 * ref.abs().max()


def test_cached_generation_matches_uncached_logits_on_cuda():
    m = build_model(tiny_config(init_std=0.2)).cuda().eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    a = generate_tokens(m, prompts, max_new_tokens=8, temperature=0)
    b = generate_tokens(m, prompts, max_new_tokens=8, temperature=0, use_cache=False)
    agree = (a.sequences == b.sequences).float().mean().item()
    assert a.sequences.is_cuda and agree > 0.9  # bf16 kernels may round differently near ties


def _recorded_graphs() -> int:
    """CUDA graphs recorded so far in this process (torch.compile's graph trees)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(0, create_if_none_exists=False)
    return 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())


def test_compiled_generation_replays_one_cuda_graph_across_calls(monkeypatch):
    """compile=True on CUDA: the decode step is graphed (no skip); a second call of the same batch size
    and cache bucket replays the first call's graph (no new recording); in fp32 the tokens equal eager's,
    left padding included (bf16 kernels fused differently may break near-ties)."""
    import contextlib

    from torch._dynamo.utils import counters

    import llmlab.generate as gen

    monkeypatch.setattr(gen, "autocast", lambda device: contextlib.nullcontext())  # fp32 on CUDA
    m = build_model(tiny_config(init_std=0.2)).cuda().eval()
    calls = [[[5, 6, 7, 8], [9, 10]], [[1, 2, 3], [4, 5, 6, 7, 8]]]
    eager = [generate_tokens(m, p, max_new_tokens=12, temperature=0).sequences for p in calls]
    counters.clear()
    first = generate_tokens(m, calls[0], max_new_tokens=12, temperature=0, compile=True)
    recorded = _recorded_graphs()
    again = generate_tokens(m, calls[1], max_new_tokens=12, temperature=0, compile=True)
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert recorded >= 1 and _recorded_graphs() == recorded
    assert torch.equal(first.sequences, eager[0]) and torch.equal(again.sequences, eager[1])


def _model_cfg(tok_dir):
    return ModelConfig(tokenizer_name=tok_dir, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160, n_layers=2,
                       vocab_size=512, max_seq_len=128)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "lion", "sophia", "muon"])
def test_pretrain_on_cuda_learns_with_every_optimizer(tmp_path, tok_dir, optimizer):
    from llmlab import load_model
    from llmlab.train.pretrain import run_pretrain

    lr = {"lion": 1e-3, "muon": 0.02}.get(optimizer, 3e-3)
    cfg = TrainConfig(max_steps=40, optimizer=optimizer, lr=lr, warmup_steps=4, batch_size=8,
                      gradient_accumulation_steps=2, eval_every=20, eval_steps=2, log_every=5,
                      datasets=["bundled:shakespeare"], output_dir=str(tmp_path / "pt"), max_seq_len=64,
                      save_best_only=False, save_every=20)
    out = run_pretrain(cfg, _model_cfg(tok_dir), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.3
    assert load_model(out / "latest").config.d_model == 64


def test_sft_lora_then_dpo_and_grpo_on_cuda(tmp_path, tok_dir):
    from llmlab.rlhf.run import run_rlhf
    from llmlab.train.pretrain import run_pretrain
    from llmlab.train.sft import run_sft

    pt = run_pretrain(TrainConfig(max_steps=20, lr=3e-3, warmup_steps=2, batch_size=8, gradient_accumulation_steps=1,
                                  eval_every=10, eval_steps=1, datasets=["bundled:shakespeare"], max_seq_len=64,
                                  output_dir=str(tmp_path / "pt"), save_best_only=False, save_every=10),
                      _model_cfg(tok_dir), progress=False)
    sft = run_sft(SFTConfig(policy_checkpoint=str(pt / "latest"), max_steps=20, learning_rate=3e-3, warmup_steps=2,
                            batch_size=8, gradient_accumulation_steps=1, eval_every=10, eval_steps=1,
                            datasets=["bundled:sft"], output_dir=str(tmp_path / "sft"), use_lora=True,
                            lora_preset="all", save_best_only=False, save_every=10), progress=False)
    for algo, data in (("dpo", "bundled:preference"), ("grpo", "bundled:prompts")):
        out = run_rlhf(RLHFConfig(algorithm=algo, policy_checkpoint=str(sft / "latest"), max_steps=3, batch_size=4,
                                  mini_batch_size=2, group_size=2, max_new_tokens=8, learning_rate=1e-4,
                                  reward_model_name=None, reward_functions=["numeric_match"], eval_every=2,
                                  eval_steps=1, save_every=2, save_best_only=False, datasets=[data], log_every=1,
                                  output_dir=str(tmp_path / algo), use_lora=True), progress=False)
        assert (tmp_path / algo / "metrics.jsonl").is_file() and (out / "adapter").is_dir()


def test_grpo_lora_rollouts_through_cuda_graphs(tmp_path, tok_dir):
    """compile: true in GRPO on CUDA: a LoRA policy's rollouts and evaluation decode through the graphed
    step (graph_cache), between updates that change the adapters in place; rewards stay sane."""
    from llmlab.rlhf.run import run_rlhf
    from llmlab.train.pretrain import run_pretrain

    pt = run_pretrain(TrainConfig(max_steps=10, lr=3e-3, warmup_steps=2, batch_size=8, gradient_accumulation_steps=1,
                                  eval_every=10, eval_steps=1, datasets=["bundled:shakespeare"], max_seq_len=64,
                                  output_dir=str(tmp_path / "pt"), save_best_only=False, save_every=10),
                      _model_cfg(tok_dir), progress=False)
    before = _recorded_graphs()
    run_rlhf(RLHFConfig(algorithm="grpo", policy_checkpoint=str(pt / "latest"), max_steps=4, batch_size=4,
                        mini_batch_size=4, group_size=4, max_new_tokens=8, learning_rate=1e-3, reward_model_name=None,
                        reward_functions=["numeric_match"], eval_every=4, eval_steps=1, save_every=4,
                        datasets=["bundled:prompts"], log_every=1, output_dir=str(tmp_path / "grpo"), use_lora=True,
                        compile=True), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3, 4]
    assert all(0 <= r["reward"] <= 1 for r in rows if "reward" in r)
    # the rollouts' decode steps were graphed; the graphs' cache went with the policy when the run ended
    assert _recorded_graphs() > before


def test_loss_rows_and_chunked_log_probs_on_the_device():
    """The head on the counted rows (positions found on the CPU, moved without a sync) gives the loss and
    gradients of every row under bf16 autocast; RLHF's chunked log-probs equal the full logits'."""
    from llmlab.train.loop import LMLoss, forward_backward
    from llmlab.train.losses import token_logprobs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 48), generator=g)
    labels = ids.clone()
    labels[:, :20] = -100  # prompts: the rows are selected

    def run(select):
        torch.manual_seed(0)
        model = build_model(tiny_config(init_std=0.2)).to(device)
        loss, _ = forward_backward(LMLoss(model), [{"input_ids": ids, "labels": labels}], device, select_rows=select)
        return loss, {n: p.grad.float() for n, p in model.named_parameters()}

    (la, ga), (lb, gb) = run(True), run(False)
    assert abs(la.item() - lb.item()) < 1e-2 * abs(lb.item())
    for n in ga:
        assert (ga[n] - gb[n]).norm() <= 0.05 * gb[n].norm() + 1e-6, n

    head = torch.nn.Linear(32, 128, bias=False).to(device)
    x = torch.randn(300, 32, device=device, requires_grad=True)
    t = torch.randint(0, 128, (300,), device=device)
    got = token_logprobs(x, head, t, chunk_rows=64)
    want = torch.log_softmax(head(x).float(), -1).gather(-1, t[:, None]).squeeze(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.autocast(device.type, dtype=torch.bfloat16):  # as RLHF scores on the GPU
        low = token_logprobs(x, head, t, chunk_rows=64)
        low_want = torch.log_softmax(head(x).float(), -1).gather(-1, t[:, None]).squeeze(1)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, low_want, rtol=1e-3, atol=1e-3)
