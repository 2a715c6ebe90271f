"""The shared loop on a tiny model: accumulation, every optimizer and schedule, checkpoints, NaN, resume."""

import json
import math
import shutil
import signal
import threading

import pytest
import torch

from conftest import tiny_config
from llmlab.checkpoint import load_model, read_checkpoint, save_checkpoint
from llmlab.config import TrainConfig
from llmlab.model import build_model
from llmlab.train.loop import (
    LMLoss,
    TrainingError,
    evaluate,
    forward_backward,
    last_run_status,
    resume_state,
    train_loop,
)
from llmlab.train.losses import label_rows
from llmlab.train.metrics import read_metrics

V = 64


class RuleBatches:
    """Sequences whose next token is (3 * token + 1) % V from a random start (a learnable bigram map),
    optionally with a -100 "prompt" of random length. Global batch n is a function of (seed, n) alone;
    this rank gets rows [rank * B, (rank + 1) * B). Resumable through state_dict."""

    def __init__(self, batch_size, *, seq_len=16, seed=0, rank=0, world_size=1, mask=False):
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.mask = rank, world_size, mask
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.n)
        rows = self.batch_size * self.world_size
        x = torch.empty(rows, self.seq_len, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (rows,), generator=g)
        for t in range(1, self.seq_len):
            x[:, t] = (3 * x[:, t - 1] + 1) % V
        labels = x.clone()
        if self.mask:
            cut = torch.randint(0, self.seq_len - 2, (rows,), generator=g)
            labels[torch.arange(self.seq_len) < cut[:, None]] = -100
        self.n += 1
        part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return {"input_ids": x[part], "labels": labels[part]}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def make_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_steps=10, lr=1e-2, warmup_steps=0, scheduler="none",
                batch_size=4, gradient_accumulation_steps=1, eval_every=1000, eval_steps=2, log_every=1,
                save_every=1000, save_best_only=True, weight_decay=0.0, datasets=["unused"])
    base.update(kw)
    return TrainConfig(**base)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_config(vocab_size=V, max_seq_len=32))


def run(tmp_path, model=None, val=True, **kw):
    cfg = make_cfg(tmp_path, **kw)
    model = model or tiny_model()
    result = train_loop(model, cfg, RuleBatches(cfg.batch_size, mask=True),
                        RuleBatches(4, seed=99) if val else None, output_dir=cfg.output_dir, progress=False)
    return model, result, read_metrics(cfg.output_dir)


def train_losses(metrics):
    return [r["loss"] for r in metrics if "loss" in r]


# --------------------------------------------------------------------------------------------------
# A step
# --------------------------------------------------------------------------------------------------


def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch():
    big = next(RuleBatches(8, mask=True, seed=3))  # prompts of different lengths: unequal token counts
    micro = [{k: v[i:i + 2] for k, v in big.items()} for i in range(0, 8, 2)]
    counts = [int((m["labels"][:, 1:] != -100).sum()) for m in micro]
    assert len(set(counts)) > 1

    def grads(batches):
        model = tiny_model()
        loss, n = forward_backward(LMLoss(model), batches, torch.device("cpu"))
        return loss, n, {k: p.grad.clone() for k, p in model.named_parameters()}

    loss_a, n_a, ga = grads(micro)
    loss_b, n_b, gb = grads([big])
    assert n_a.item() == n_b.item() == sum(counts)
    assert abs(loss_a.item() - loss_b.item()) < 1e-6
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=1e-6, msg=k)

    # the test can tell: averaging per-micro-batch means (the naive way) gives another gradient
    model = tiny_model()
    for m in micro:
        loss_sum = LMLoss(model)(m["input_ids"], m["labels"])
        (loss_sum / int((m["labels"][:, 1:] != -100).sum()) / len(micro)).backward()
    assert max((p.grad - gb[k]).abs().max().item() for k, p in model.named_parameters()) > 1e-5


def test_the_head_skips_rows_without_labels_with_the_same_gradients(monkeypatch):
    """forward_backward and evaluate hand LMLoss the counted positions (SFT's masked prompts): the same
    loss and gradients as with every row, fewer rows through the head; select_rows=False (compile)
    passes none."""
    import llmlab.train.losses as losses

    batch = next(RuleBatches(4, mask=True, seed=5))
    assert label_rows(batch["labels"]) is not None
    seen = []
    real = losses.linear_cross_entropy
    monkeypatch.setattr(losses, "linear_cross_entropy", lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))

    def run(select):
        model = tiny_model()
        loss, n = forward_backward(LMLoss(model), [batch], torch.device("cpu"), select_rows=select)
        val, _ = evaluate(LMLoss(model), iter([batch]), 1, torch.device("cpu"), select_rows=select)
        return loss, n, val, {k: p.grad.clone() for k, p in model.named_parameters()}

    loss_a, n_a, val_a, ga = run(True)
    loss_b, n_b, val_b, gb = run(False)
    rows = batch["input_ids"].numel()
    assert seen == [n_a.item(), n_a.item(), rows, rows] and n_a.item() < 0.9 * rows
    assert abs(loss_a.item() - loss_b.item()) < 1e-6 and abs(val_a - val_b) < 1e-6
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=1e-6, msg=k)


def test_sophias_estimate_with_rows_samples_the_counted_positions_only():
    """LMLoss(gnb=True, rows=...): the GNB loss over the counted positions' logits alone (the same samples
    as gnb_sampled_loss on them), the head run on those rows only."""
    from llmlab.optim import gnb_sampled_loss

    batch = next(RuleBatches(4, mask=True, seed=5))
    rows = label_rows(batch["labels"])
    model = tiny_model()
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    torch.manual_seed(3)
    got = LMLoss(model)(batch["input_ids"], batch["labels"], gnb=True, rows=rows)
    assert seen == [rows.numel()]
    with torch.no_grad():
        hidden = model(batch["input_ids"], output_hidden=True).reshape(-1, model.lm_head.in_features)
        torch.manual_seed(3)
        want = gnb_sampled_loss(model.lm_head(hidden[rows]))
    assert abs(got.item() - want.item()) < 1e-6


def test_step_counts_updates_and_accumulation_reads_micro_batches(tmp_path):
    class Counting(RuleBatches):  # a data iterator that skips (and counts) bad records
        @property
        def skipped_invalid(self):
            return self.n // 2

    cfg = make_cfg(tmp_path, max_steps=3, gradient_accumulation_steps=3, batch_size=2)
    data = Counting(2)
    result = train_loop(tiny_model(), cfg, data, None, output_dir=cfg.output_dir, progress=False)
    assert result.step == 3 and data.n == 9  # 3 updates x 3 micro-batches
    assert result.tokens_seen == 9 * 2 * 16
    metrics = read_metrics(cfg.output_dir)
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert [r["skipped_invalid"] for r in metrics] == [1, 3, 4]  # the iterator's counter is logged


# --------------------------------------------------------------------------------------------------
# Optimizers and schedules
# --------------------------------------------------------------------------------------------------

LR = {"adamw": 1e-2, "adafactor": 1e-2, "lion": 2e-3, "sophia": 1e-2, "muon": 2e-2}


@pytest.mark.parametrize("name", list(LR))
def test_loss_decreases_with_every_optimizer(tmp_path, name, monkeypatch):
    from llmlab import optim

    refreshes = []
    original = optim.SophiaG.refresh_hessian
    monkeypatch.setattr(optim.SophiaG, "refresh_hessian",
                        lambda self, closure, batch_tokens: (refreshes.append(batch_tokens),
                                                             original(self, closure, batch_tokens)))
    model, result, metrics = run(tmp_path, val=False, optimizer=name, lr=LR[name], max_steps=30,
                                 sophia_update_k=5)
    losses = train_losses(metrics)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, (name, losses)
    if name == "sophia":  # the Hessian estimate is refreshed every k steps, from the step's tokens
        assert len(refreshes) == 6 and all(n > 0 for n in refreshes)
    else:
        assert refreshes == []


def closed_form_lr(n, cfg):
    """lr of update n (1-based): linear warmup to lr over warmup_steps, then the schedule to lr*min_lr_ratio."""
    w, m, lo = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
    if n <= w:
        return cfg.lr * n / w
    p = (n - w) / (m - w)
    shape = {"none": 1.0, "linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)),
             "polynomial": (1 - p) ** cfg.poly_power}[cfg.scheduler]
    return cfg.lr * (shape if cfg.scheduler == "none" else lo + (1 - lo) * shape)


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "polynomial", "none"])
def test_logged_lr_follows_the_closed_form_and_warmup_reaches_lr(tmp_path, scheduler):
    kw = dict(scheduler=scheduler, warmup_steps=4, max_steps=12, lr=3e-3, min_lr_ratio=0.1, poly_power=1.5)
    _, _, metrics = run(tmp_path, val=False, **kw)
    cfg = make_cfg(tmp_path, **kw)
    lrs = {r["step"]: r["lr"] for r in metrics}
    assert sorted(lrs) == list(range(1, 13))
    assert lrs[4] == pytest.approx(3e-3, rel=1e-12)  # warmup ends at the peak lr
    assert lrs[1] == pytest.approx(3e-3 / 4, rel=1e-12)
    for n in (1, 2, 5, 8, 11, 12):
        assert lrs[n] == pytest.approx(closed_form_lr(n, cfg), rel=1e-9, abs=1e-15), n
    if scheduler != "none":
        assert lrs[12] == pytest.approx(3e-4, rel=1e-9) and lrs[8] < lrs[5]


def test_only_trainable_parameters_move_and_gradient_checkpointing_is_exact(tmp_path):
    model = tiny_model()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("layers.1.mlp"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain_calls = []
    model.layers[1].register_forward_pre_hook(lambda *a: plain_calls.append(1))
    _, _, plain = run(tmp_path / "a", model=model, val=False, max_steps=3)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != p.requires_grad, n

    ckpt_model = tiny_model()
    for n, p in ckpt_model.named_parameters():
        p.requires_grad_(n.startswith("layers.1.mlp"))
    ckpt_calls = []
    ckpt_model.layers[1].register_forward_pre_hook(lambda *a: ckpt_calls.append(1))
    _, _, recomputed = run(tmp_path / "b", model=ckpt_model, val=False, max_steps=3, gradient_checkpointing=True)
    assert ckpt_model.gradient_checkpointing is True
    # the trainable block really was checkpointed: it ran again in every backward
    assert plain_calls and len(ckpt_calls) == 2 * len(plain_calls)
    assert train_losses(recomputed) == train_losses(plain)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="needs a C++ compiler")
def test_compile_trains_the_model_and_its_loss_as_one_compiled_module(tmp_path, monkeypatch):
    """compile: true compiles LMLoss (the model and the chunked loss together, one graph) and trains to
    the eager run's losses; checkpoints keep the plain model's parameter names. The compiled step gets
    every row (no `rows=`: its number changes with each batch), the eager one the counted rows."""
    import llmlab.train.loop as loop

    selects, real_fb = [], loop.forward_backward
    monkeypatch.setattr(loop, "forward_backward", lambda *a, **kw: selects.append(kw["select_rows"]) or real_fb(*a, **kw))
    _, _, eager = run(tmp_path / "a", val=False, max_steps=4)
    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or real_compile(fn, **kw))
    model, _, fused = run(tmp_path / "b", val=False, max_steps=4, compile=True, save_best_only=False, save_every=4)
    assert [type(getattr(fn, "__self__", fn)) for fn in compiled] == [LMLoss]
    assert selects == [True] * 4 + [False] * 4
    assert train_losses(fused) == pytest.approx(train_losses(eager), rel=1e-4)
    assert set(read_checkpoint(tmp_path / "b" / "run" / "latest").state_dict()) == set(model.state_dict())


# --------------------------------------------------------------------------------------------------
# Evaluation and checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("best_only", [True, False])
def test_best_and_latest_checkpoints(tmp_path, best_only):
    saves = []

    def spy(path, model, **kw):
        saves.append((path.name, kw["trainer_state"]["step"]))
        return save_checkpoint(path, model, **kw)

    cfg = make_cfg(tmp_path, max_steps=9, eval_every=2, save_every=4, save_best_only=best_only, lr=3e-2,
                   optimizer="lion")
    train_loop(tiny_model(), cfg, RuleBatches(4, mask=True), RuleBatches(4, seed=99), output_dir=cfg.output_dir,
               progress=False, save_hook=spy)
    metrics = read_metrics(cfg.output_dir)
    vals = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    assert [s for s, _ in vals] == [2, 4, 6, 8, 9]  # every eval_every steps and at the end
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in metrics if "val_loss" in r)
    improved = [s for i, (s, v) in enumerate(vals) if all(v < w for _, w in vals[:i])]
    assert [s for name, s in saves if name == "best"] == improved
    assert [s for name, s in saves if name == "latest"] == ([] if best_only else [4, 8, 9])
    out = tmp_path / "run"
    assert (out / "latest").exists() != best_only
    best = read_checkpoint(out / "best")
    state = best.trainer_state()
    assert state["step"] == improved[-1] and state["best_val_loss"] == min(v for _, v in vals)
    assert (best.path / "tokenizer").exists() is False  # no tokenizer given to the loop here
    tensors = best.trainer_tensors()
    assert set(tensors) >= {"optimizer", "scheduler", "rng"} and tensors["scheduler"]["step"] == improved[-1]
    assert state["data"] == [{"n": improved[-1]}]
    assert json.loads((best.path / "training_config.json").read_text())["max_steps"] == 9
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


class NoBatches(RuleBatches):
    """An empty validation set: every evaluation reads no batch."""

    def __next__(self):
        raise StopIteration


@pytest.mark.parametrize("val", [None, "empty"])
def test_save_best_only_without_validation_still_saves_the_final_state(tmp_path, val, capsys):
    model = tiny_model()
    cfg = make_cfg(tmp_path, max_steps=3, eval_every=2, save_every=2, save_best_only=True)
    result = train_loop(model, cfg, RuleBatches(4, mask=True), NoBatches(4) if val else None,
                        output_dir=cfg.output_dir, progress=True)
    assert result.best_checkpoint is None and result.latest_checkpoint == tmp_path / "run" / "latest"
    assert not (tmp_path / "run" / "best").exists()
    assert read_checkpoint(tmp_path / "run" / "latest").trainer_state()["step"] == 3  # the final step only
    loaded = load_model(tmp_path / "run" / "latest")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    out = capsys.readouterr().out
    assert "no validation loss, so no best/" in out
    assert "; no validation loss (no validation data, or no evaluation ran);" in out and "val loss None" not in out


def test_a_resumed_run_that_never_beats_its_best_still_saves_its_final_state(tmp_path, capsys):
    """save_best_only, resumed from best/ whose recorded val loss no evaluation can beat (set to 0): the
    run's extra steps went nowhere ("saved no checkpoint"); now they go to latest/."""
    cfg = make_cfg(tmp_path, max_steps=3, eval_every=1)
    first = train_loop(tiny_model(), cfg, RuleBatches(4), RuleBatches(4, seed=9), output_dir=cfg.output_dir)
    assert first.best_checkpoint is not None and first.latest_checkpoint is None
    state_file = first.best_checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["best_val_loss"] = 0.0
    state_file.write_text(json.dumps(state))
    start = resume_state(first.best_checkpoint)
    model = load_model(first.best_checkpoint)
    longer = make_cfg(tmp_path, max_steps=start.step + 2, eval_every=1)
    capsys.readouterr()
    result = train_loop(model, longer, RuleBatches(4), RuleBatches(4, seed=9), output_dir=longer.output_dir,
                        start_state=start, progress=True)
    assert result.best_checkpoint is None and result.latest_checkpoint == tmp_path / "run" / "latest"
    assert read_checkpoint(result.latest_checkpoint).trainer_state()["step"] == start.step + 2
    assert "no evaluation of this run beat the best val loss it started from, 0.0" in capsys.readouterr().out


def test_eval_steps_sets_how_many_validation_batches_are_read(tmp_path):
    tokens = []
    for steps in (1, 3):
        _, _, metrics = run(tmp_path / str(steps), max_steps=1, eval_steps=steps)
        tokens += [r["val_tokens"] for r in metrics if "val_tokens" in r]
    assert tokens == [4 * 15, 3 * 4 * 15]  # batches of 4 rows of 16 tokens: 15 targets a row


def test_log_every_sets_which_steps_log_the_loss(tmp_path):
    _, _, metrics = run(tmp_path, val=False, max_steps=7, log_every=3)
    assert [r["step"] for r in metrics if r.get("loss") is not None] == [3, 6, 7]  # and the last step


# --------------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------------


class Poisoned(RuleBatches):
    """Turns the model's embedding output into NaN for the training batches listed in `bad` (0-based)."""

    def __init__(self, *args, bad=(), flag=None, **kw):
        super().__init__(*args, **kw)
        self.bad, self.flag = set(bad), flag

    def __next__(self):
        self.flag["on"] = self.n in self.bad
        return super().__next__()


def poisoned_model(flag):
    model = tiny_model()
    model.embed_tokens.register_forward_hook(
        lambda mod, inp, out: out * float("nan") if (flag["on"] and mod.training) else None)
    return model


def test_nan_stop_keeps_the_last_good_checkpoint(tmp_path):
    flag = {"on": False}
    cfg = make_cfg(tmp_path, max_steps=10, save_every=2, save_best_only=False)
    with pytest.raises(TrainingError, match=r"NaN/Inf at step 5.*latest"):
        train_loop(poisoned_model(flag), cfg, Poisoned(4, bad={4}, flag=flag), None, output_dir=cfg.output_dir,
                   progress=False)
    latest = read_checkpoint(tmp_path / "run" / "latest")
    assert latest.trainer_state()["step"] == 4
    assert all(torch.isfinite(t).all() for t in latest.state_dict().values())
    assert [r["step"] for r in read_metrics(cfg.output_dir)] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "loss.png").exists()
    assert last_run_status(cfg.output_dir).stopped == "nan"


def test_nan_skip_counts_skipped_updates_and_stops_after_max(tmp_path):
    flag = {"on": False}
    cfg = make_cfg(tmp_path, max_steps=8, nan_policy="skip", max_nan_skips=5)
    model = poisoned_model(flag)
    result = train_loop(model, cfg, Poisoned(4, bad={2, 5}, flag=flag), None, output_dir=cfg.output_dir,
                        progress=False)
    assert result.step == 8 and result.nan_skips == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = read_metrics(cfg.output_dir)
    assert metrics[-1]["nan_skips"] == 2
    assert [r["step"] for r in metrics if r.get("skipped")] == [3, 6]  # logged, without a loss
    assert all(math.isfinite(r["loss"]) for r in metrics if not r.get("skipped"))

    flag["on"] = False
    cfg = make_cfg(tmp_path / "b", max_steps=8, nan_policy="skip", max_nan_skips=2)
    with pytest.raises(TrainingError, match="2 steps had a NaN"):
        train_loop(poisoned_model(flag), cfg, Poisoned(4, bad={1, 3}, flag=flag), None, output_dir=cfg.output_dir,
                   progress=False)


# --------------------------------------------------------------------------------------------------
# Exact resume through run_pretrain (real data, real tokenizer), stopped by SIGTERM
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from llmlab.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(["bundled:shakespeare"], 300, out, max_docs=200)
    return out


def pretrain_configs(tmp_path, tokenizer_dir, **kw):
    from llmlab.config import ModelConfig

    model_cfg = ModelConfig(tokenizer_name=str(tokenizer_dir), d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                            n_layers=2, vocab_size=320, max_seq_len=32, dropout=0.1)
    base = dict(output_dir=str(tmp_path), max_steps=8, lr=1e-2, warmup_steps=2, scheduler="cosine", batch_size=2,
                gradient_accumulation_steps=2, eval_every=3, eval_steps=2, log_every=1, save_every=100,
                save_best_only=False, datasets=["bundled:shakespeare"], val_fraction=0.1, seed=7,
                optimizer="sophia", sophia_update_k=3)
    base.update(kw)
    return TrainConfig(**base), model_cfg


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigterm_then_resume_gives_exactly_the_uninterrupted_losses(tmp_path, tokenizer_dir, monkeypatch, capsys):
    from llmlab.train import pretrain

    cfg_a, model_cfg = pretrain_configs(tmp_path / "a", tokenizer_dir)
    pretrain.run_pretrain(cfg_a, model_cfg, progress=False)
    full = read_metrics(tmp_path / "a")
    assert [r["step"] for r in full] == list(range(1, 9))

    stop_at = 4  # SIGTERM arrives while step 4 reads its data: step 4 finishes, latest/ is saved, return

    class Interrupted(pretrain.PretrainBatches):
        def __next__(self):
            batch = super().__next__()
            if self.batches_yielded == stop_at * 2 - 1 and self._stream is not None and self._stream.split == "train":
                signal.raise_signal(signal.SIGTERM)
            return batch

    cfg_b, _ = pretrain_configs(tmp_path / "b", tokenizer_dir)
    monkeypatch.setattr(pretrain, "PretrainBatches", Interrupted)
    pretrain.run_pretrain(cfg_b, model_cfg, progress=False)
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert f"llm-lab pretrain --resume {tmp_path / 'b' / 'latest'}" in out
    status = last_run_status(tmp_path / "b")
    assert (status.stopped, status.step, status.max_steps) == ("interrupted", stop_at, 8)
    assert status.resume == f"llm-lab pretrain --resume {tmp_path / 'b' / 'latest'}"
    assert read_checkpoint(tmp_path / "b" / "latest").trainer_state()["step"] == stop_at
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, stop_at + 1))

    pretrain.run_pretrain(cfg_b, resume=str(tmp_path / "b" / "latest"), progress=False)
    resumed = read_metrics(tmp_path / "b")
    assert last_run_status(tmp_path / "b").stopped == "finished"
    for key in ("step", "loss", "lr", "grad_norm", "val_loss", "tokens_seen"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in full], key

    # extend max_steps; switching optimizer needs --no-optimizer-state
    longer = cfg_b.with_overrides(["max_steps=10", "optimizer=adamw"])
    with pytest.raises(Exception, match="no-optimizer-state"):
        pretrain.run_pretrain(longer, resume=str(tmp_path / "b" / "latest"), progress=False)
    pretrain.run_pretrain(longer, resume=str(tmp_path / "b" / "latest"), load_optimizer_state=False, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 11))
    state = resume_state(tmp_path / "b" / "latest")
    assert state.step == 10 and state.optimizer["param_groups"][0].get("betas") == (0.9, 0.999)


def test_run_pretrain_checks_vocab_size_and_saves_the_resolved_configs(tmp_path, tokenizer_dir):
    from llmlab.errors import ConfigError
    from llmlab.train.pretrain import run_pretrain

    cfg, model_cfg = pretrain_configs(tmp_path / "out", tokenizer_dir, max_steps=1, warmup_steps=0, eval_every=1)
    small = model_cfg.with_overrides(["vocab_size=299"])  # the tokenizer has 300 tokens
    with pytest.raises(ConfigError, match=r"vocab_size: 299 .* 300 tokens"):
        run_pretrain(cfg, small, progress=False)
    with pytest.raises(ConfigError, match="model config"):
        run_pretrain(cfg, None, progress=False)
    assert run_pretrain(cfg, model_cfg, progress=False) == tmp_path / "out"
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved == cfg.to_dict()
    assert json.loads((tmp_path / "out" / "model_config.json").read_text())["vocab_size"] == 320
    assert (tmp_path / "out" / "best" / "tokenizer" / "tokenizer.json").is_file()


def test_a_new_run_into_a_finished_runs_folder_says_it_replaces_it(tmp_path, tokenizer_dir, capsys):
    """Re-running a stage into the same output_dir silently replaced best/ and metrics.jsonl: a new run
    now says so (and how to keep or continue the old one); resuming it does not."""
    from llmlab.train.pretrain import run_pretrain

    cfg, model_cfg = pretrain_configs(tmp_path / "out", tokenizer_dir, max_steps=1, warmup_steps=0, eval_every=1,
                                      optimizer="adamw")
    run_pretrain(cfg, model_cfg, progress=False)
    assert "holds a finished" not in capsys.readouterr().out
    run_pretrain(cfg, model_cfg, progress=False)
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'out'} holds a finished pretrain run (1 steps); this new run replaces" in out
    assert f"--resume {tmp_path / 'out' / 'latest'} max_steps=N" in out
    run_pretrain(cfg.with_overrides(["max_steps=2"]), None, resume=str(tmp_path / "out" / "latest"), progress=False)
    assert "holds a finished" not in capsys.readouterr().out


def test_an_exception_in_a_step_records_the_run_as_an_error(tmp_path):
    """A bad batch (any exception but out-of-memory and NaN, which have their own states) leaves
    run_state.json at "error", not "running"."""
    from llmlab.train.loop import last_run_status

    class Broken(RuleBatches):
        def __next__(self):
            if self.n >= 2:
                raise ValueError("a bad record")
            return super().__next__()

    cfg = make_cfg(tmp_path, max_steps=5)
    with pytest.raises(ValueError, match="a bad record"):
        train_loop(tiny_model(), cfg, Broken(4), None, output_dir=cfg.output_dir)
    status = last_run_status(cfg.output_dir)
    assert status is not None and (status.stopped, status.step) == ("error", 2)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_without_a_readable_trainer_state_pt(tmp_path, damage, capsys):
    """A missing trainer_state.pt resumed silently with a fresh optimizer; an unreadable one was refused even
    with --no-optimizer-state, which its own error message recommends. Now: both refused while the optimizer
    state is wanted, both resumable without it (the random states start afresh, with a note)."""
    from llmlab.errors import CheckpointError

    cfg = make_cfg(tmp_path, max_steps=2, save_best_only=False, save_every=2)
    train_loop(tiny_model(), cfg, RuleBatches(4), None, output_dir=cfg.output_dir, progress=False)
    latest = tmp_path / "run" / "latest"
    pt = latest / "trainer_state.pt"
    pt.unlink() if damage == "missing" else pt.write_bytes(pt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="--no-optimizer-state"):
        resume_state(latest)
    start = resume_state(latest, optimizer=False)
    assert start.step == 2 and start.optimizer is None and start.rng_states is None
    assert start.data_states == [{"n": 2}]  # the data position is in trainer_state.json
    longer = make_cfg(tmp_path, max_steps=3)
    result = train_loop(load_model(latest), longer, RuleBatches(4), None, output_dir=longer.output_dir,
                        start_state=start, progress=False)
    assert result.step == 3
    assert f"note: {pt} {'is missing' if damage == 'missing' else 'cannot be read'}: the optimizer" in \
        capsys.readouterr().out


def test_an_output_dir_that_cannot_be_made_is_a_one_line_error(tmp_path, tokenizer_dir):
    from llmlab.errors import ConfigError
    from llmlab.train.pretrain import run_pretrain

    (tmp_path / "file").write_text("x")
    cfg, model_cfg = pretrain_configs(tmp_path / "file" / "run", tokenizer_dir, max_steps=1, warmup_steps=0)
    with pytest.raises(ConfigError, match=r"output_dir: cannot create .*file/run \(a file is in the way\); pick a folder"):
        run_pretrain(cfg, model_cfg, progress=False)


def test_resuming_with_changed_settings_says_what_changed_and_what_it_does(tmp_path, tokenizer_dir, capsys):
    """A resumed run took changed settings without a word: a shorter max_steps dropped the lr to ~0 at once and
    a new batch_size made validation read other batches than the best val loss it competes with."""
    from llmlab.train.pretrain import run_pretrain

    cfg, model_cfg = pretrain_configs(tmp_path / "out", tokenizer_dir, max_steps=3, warmup_steps=0, eval_every=3,
                                      optimizer="adamw")
    run_pretrain(cfg, model_cfg, progress=False)
    latest = str(tmp_path / "out" / "latest")
    capsys.readouterr()
    run_pretrain(cfg.with_overrides(["max_steps=4", "scheduler=none"]), resume=latest, progress=False)
    out = capsys.readouterr().out
    assert "changed since the checkpoint: max_steps 3 -> 4, scheduler \"cosine\" -> \"none\"" in out
    assert "note: the learning rate of step 4 is 0.01 with these settings (the checkpoint's schedule gave 0)" in out
    assert "validation reads other batches" not in out and "writes to output_dir" not in out
    moved = tmp_path / "copy"
    shutil.copytree(latest, moved / "latest")
    run_pretrain(cfg.with_overrides(["max_steps=5", "scheduler=none", "batch_size=1"]), resume=str(moved / "latest"),
                 progress=False)
    out = capsys.readouterr().out
    assert "changed since the checkpoint: max_steps 4 -> 5, batch_size 2 -> 1" in out
    assert "learning rate of step" not in out  # none's lr is the same at step 5
    assert "note: batch_size changed, so validation reads other batches" in out
    assert f"note: this run writes to output_dir={tmp_path / 'out'}, not {moved}" in out


@pytest.mark.parametrize("width", [80, 120])
def test_the_progress_bar_keeps_the_step_count_and_eta_on_a_narrow_terminal(width):
    """At 80 columns rich squeezed every column: the step count read '120…' and the ETA '-:--:…'."""
    import io

    from rich.console import Console

    from llmlab.train.metrics import _Bar

    buf = io.StringIO()
    bar = _Bar(100000, 12000, "pretrain", console=Console(file=buf, width=width, force_terminal=False))
    bar.fields(loss="4.4084", lr="1.15e-05", gnorm="0.793", tps="29,606")
    bar.close()
    line = buf.getvalue().strip().splitlines()[-1]
    assert "12000/100000 loss 4.4084 lr 1.15e-05 gnorm 0.793 29,606 tok/s ETA" in line and "…" not in line
    assert ("pretrain" in line) == (width == 120)
