"""Processes: 2-rank torchrun (DDP and FSDP2, gloo on CPU) equals one process; SIGTERM exits 0 and resumes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab.config import ModelConfig, TrainConfig
from llmlab.train.loop import train_loop
from llmlab.train.metrics import read_metrics
from test_train_loop import RuleBatches, tiny_model, tokenizer_dir  # noqa: F401 - tokenizer_dir is a fixture

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def loop_config(out, strategy="ddp") -> TrainConfig:
    return TrainConfig(output_dir=str(out), max_steps=4, lr=1e-2, warmup_steps=1, scheduler="cosine",
                       gradient_accumulation_steps=2, eval_every=2, eval_steps=2, log_every=1, save_every=4,
                       save_best_only=False, distributed=strategy, optimizer="adamw", datasets=["unused"])


def run_synthetic(out, strategy, rank, world, info=None):
    """Global micro-batch of 4 sequences (2 per rank with 2 ranks), unequal label counts per rank."""
    per_rank = 4 // world
    train = RuleBatches(per_rank, mask=True, seed=1, rank=rank, world_size=world)
    val = RuleBatches(2 // world if world == 2 else 2, seed=99, rank=rank, world_size=world)
    return train_loop(tiny_model(), loop_config(out, strategy), train, val, output_dir=out, progress=False,
                      dist_info=info)


WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path

    from llmlab.config import ModelConfig, TrainConfig
    from llmlab.train.distributed import init_distributed, shutdown
    from llmlab.train.pretrain import run_pretrain
    from test_train_distributed import run_synthetic

    import json

    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    import llmlab.train.loop as loop

    out, tok = Path(sys.argv[1]), sys.argv[2]
    info = init_distributed()
    assert info.world_size == 2
    real_wrap = loop.wrap_model

    def checked_wrap(module, inner, info, strategy="ddp"):
        # the strategy really was applied: FSDP2 shards every parameter (DTensor), DDP wraps the module
        wrapped = real_wrap(module, inner, info, strategy)
        params = list(wrapped.parameters())
        facts = {"strategy": strategy, "fsdp_root": isinstance(wrapped, FSDPModule),
                 "fsdp_blocks": sum(isinstance(b, FSDPModule) for b in inner.layers),
                 "ddp": isinstance(wrapped, DistributedDataParallel),
                 "dtensor": sum(isinstance(p, DTensor) for p in params), "params": len(params),
                 "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
                 "numel": sum(p.numel() for p in params)}
        (out / f"wrap_{strategy}_{info.rank}.json").write_text(json.dumps(facts))
        return wrapped

    loop.wrap_model = checked_wrap
    for strategy in ("ddp", "fsdp"):
        run_synthetic(out / strategy, strategy, info.rank, info.world_size, info)
    loop.wrap_model = real_wrap
    model_cfg = ModelConfig(tokenizer_name=tok, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                            vocab_size=320, max_seq_len=32)
    cfg = TrainConfig(output_dir=str(out / "pretrain"), max_steps=2, lr=1e-3, warmup_steps=1, batch_size=2,
                      gradient_accumulation_steps=1, eval_every=2, eval_steps=1, log_every=1, save_every=2,
                      save_best_only=False, datasets=["bundled:shakespeare"], val_fraction=0.1)
    run_pretrain(cfg, model_cfg, progress=False)
    shutdown(info)
""")


@pytest.mark.slow
def test_two_process_ddp_and_fsdp_match_one_process(tmp_path, tokenizer_dir):  # noqa: F811
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path), str(tokenizer_dir)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for rank in (0, 1):  # the worker saw each strategy applied, no silent fallback
        ddp = json.loads((tmp_path / f"wrap_ddp_{rank}.json").read_text())
        fsdp = json.loads((tmp_path / f"wrap_fsdp_{rank}.json").read_text())
        assert ddp["ddp"] and not ddp["fsdp_root"] and ddp["dtensor"] == 0
        assert fsdp["fsdp_root"] and fsdp["fsdp_blocks"] == 2 and not fsdp["ddp"]
        assert fsdp["dtensor"] == fsdp["params"] > 0  # every parameter sharded
        assert fsdp["local_numel"] < 0.75 * fsdp["numel"]  # each rank holds about half

    run_synthetic(tmp_path / "single", "ddp", 0, 1)
    single = read_metrics(tmp_path / "single")
    weights = load_file(str(tmp_path / "single" / "latest" / "model.safetensors"))
    for strategy in ("ddp", "fsdp"):
        multi = read_metrics(tmp_path / strategy)
        assert [r["step"] for r in multi] == [r["step"] for r in single] == [1, 2, 3, 4]  # rank 0 logs, once
        for key in ("loss", "val_loss", "grad_norm", "lr"):
            for a, b in zip(multi, single):
                assert (a.get(key) is None) == (b.get(key) is None)
                if a.get(key) is not None:
                    assert abs(a[key] - b[key]) <= 1e-5, (strategy, key, a, b)
        other = load_file(str(tmp_path / strategy / "latest" / "model.safetensors"))
        assert other.keys() == weights.keys()
        for k in weights:
            torch.testing.assert_close(other[k], weights[k], rtol=0, atol=1e-5, msg=f"{strategy} {k}")
        state = json.loads((tmp_path / strategy / "latest" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["data"] == [{"n": 8}, {"n": 8}]

    state = json.loads((tmp_path / "pretrain" / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 2 and len(state["data"]) == 2 and state["data"][0] != state["data"][1]
    assert [r["step"] for r in read_metrics(tmp_path / "pretrain")] == [1, 2]


def test_sigterm_exits_0_and_leaves_a_resumable_checkpoint(tmp_path, tokenizer_dir):  # noqa: F811
    from llmlab.train.pretrain import run_pretrain, train_config_from_checkpoint

    out = tmp_path / "run"
    model_cfg = ModelConfig(tokenizer_name=str(tokenizer_dir), d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                            n_layers=2, vocab_size=320, max_seq_len=32)
    cfg = TrainConfig(output_dir=str(out), max_steps=100_000, lr=1e-3, warmup_steps=2, batch_size=2,
                      gradient_accumulation_steps=1, eval_every=100_000, log_every=1, save_every=100_000,
                      save_best_only=True, datasets=["bundled:shakespeare"], val_fraction=0.1)
    cfg.save(tmp_path / "train.json")
    model_cfg.save(tmp_path / "model.json")
    proc = subprocess.Popen([sys.executable, "-m", "llmlab.train.pretrain", "--config", str(tmp_path / "train.json"),
                             "--model-config", str(tmp_path / "model.json"), "--no-progress"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while len(read_metrics(out)) < 3:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert f"llm-lab pretrain --resume {out / 'latest'}" in output
    step = json.loads((out / "latest" / "trainer_state.json").read_text())["step"]
    assert step >= 3 and read_metrics(out)[-1]["step"] == step  # save_best_only, yet latest/ on SIGTERM

    resumed_cfg = train_config_from_checkpoint(out / "latest").with_overrides([f"max_steps={step + 2}"])
    run_pretrain(resumed_cfg, resume=str(out / "latest"), progress=False)
    assert [r["step"] for r in read_metrics(out)][-3:] == [step, step + 1, step + 2]


@pytest.mark.parametrize("threads,local_ranks,cores,expected", [
    (2, 2, 2, "OMP_NUM_THREADS=1 (or LLMLAB_THREADS=1"),  # the reported case: 2 ranks x 2 threads, 2 cores
    (8, 4, 16, "OMP_NUM_THREADS=4 (or LLMLAB_THREADS=4"),
    (1, 4, 2, "--nproc_per_node=2"),  # already one thread each: fewer ranks is the fix
    (1, 2, 2, None),
    (4, 2, 8, None),
    (16, 1, 2, None),  # one rank: not a distributed oversubscription
])
def test_oversubscription_notice_decides_from_threads_ranks_and_cores(threads, local_ranks, cores, expected):
    from llmlab.device import oversubscription_notice

    notice = oversubscription_notice(threads, local_ranks, cores)
    if expected is None:
        assert notice is None
    else:
        assert expected in notice and "\n" not in notice
        assert f"{local_ranks} ranks on this machine x {threads} threads each" in notice and f"{cores} cores" in notice


@pytest.mark.parametrize("rank", [0, 1])
def test_init_distributed_says_it_on_rank_0_only_and_keeps_the_thread_count(rank, monkeypatch, capsys):
    """Joining the group (torchrun's environment, the collectives faked) prints the notice once on rank 0
    and never changes torch's thread count; an idempotent second call prints nothing."""
    import torch.distributed as dist

    import llmlab.train.distributed as d

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: joined.append(a))
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(d, "available_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("the thread count was changed"))
    info = d.init_distributed()
    assert info.world_size == 2 and info.rank == rank and joined
    d.init_distributed()
    out = capsys.readouterr().out
    assert out.count("OMP_NUM_THREADS=1") == (1 if rank == 0 else 0)
    assert out.count("\n") == (1 if rank == 0 else 0)
