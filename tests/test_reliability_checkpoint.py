"""Checkpoint writes survive kill -9 and full disks: the last complete checkpoint always stays loadable.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_reliability_checkpoint.py -q

The writer runs in a forked child (torch is already imported, so a child starts in milliseconds) and is
killed with SIGKILL: at random moments of a save loop, inside a save (after the weights are written), and
between the two renames of the fallback swap. Every saved folder carries its step both in
`trainer_state.json` and in one weight, so a folder mixing two saves would be caught.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_config

import llmlab.atomic as atomic
from llmlab.checkpoint import load_model, read_checkpoint, resolve_checkpoint, save_checkpoint
from llmlab.errors import CheckpointError, CheckpointWriteError, LLMLabError
from llmlab.model import build_model

FORK = mp.get_context("fork")


def _big_model():
    # ~6M parameters (24 MB of fp32): a save takes long enough for a random kill to land inside it.
    return build_model(tiny_config(d_model=256, n_heads=4, n_kv_heads=2, d_ff=768, n_layers=3, vocab_size=4096))


def _save_step(root: Path, model, step: int) -> None:
    with torch.no_grad():
        model.embed_tokens.weight[0, 0] = float(step)
    save_checkpoint(root / "latest", model, trainer_state={"step": step},
                    trainer_tensors={"rng": torch.get_rng_state()})


def _check_consistent(root: Path) -> int:
    """The checkpoint `resolve_checkpoint(root)` picks loads, and its weights and state are one save's."""
    ckpt = read_checkpoint(root)
    assert ".tmp-" not in ckpt.path.name
    step = ckpt.trainer_state()["step"]
    assert ckpt.meta["step"] == step
    assert ckpt.trainer_tensors()["rng"].dtype == torch.uint8
    model = load_model(ckpt.path)
    assert model.embed_tokens.weight[0, 0].item() == float(step)
    return step


def _save_loop(root: str, log: str, start: int) -> None:
    torch.set_num_threads(1)
    model = _big_model()
    step = start
    while True:
        step += 1
        _save_step(Path(root), model, step)
        with open(log, "a") as f:
            f.write(f"{step}\n")


def _last_logged(log: Path) -> int:
    lines = log.read_text().split() if log.exists() else []
    return int(lines[-1]) if lines else 0


def test_sigkill_at_random_moments_of_a_save_loop_keeps_the_last_checkpoint(tmp_path):
    rng = random.Random(9)
    root, log = tmp_path / "run", tmp_path / "saved.log"
    last, mid_save_kills = 0, 0
    for _ in range(4):
        child = FORK.Process(target=_save_loop, args=(str(root), str(log), last))
        child.start()
        deadline = time.monotonic() + 60
        while _last_logged(log) <= last and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until this child completed one save of its own
        assert _last_logged(log) > last, "the child never finished a save"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        mid_save_kills += bool(atomic.leftovers(root / "latest", ".tmp-"))
        logged = _last_logged(log)
        step = _check_consistent(root)
        # the save that was reported complete is never lost (the one in flight may or may not be there)
        assert step in (logged, logged + 1)
        last = step
    # the next save clears the half-written folders the kills left behind
    _save_step(root, _big_model(), last + 1)
    assert _check_consistent(root) == last + 1
    assert sorted(p.name for p in root.iterdir()) == ["latest"], f"{mid_save_kills} kills landed mid-save"


def _kill_inside_save(root: str) -> None:
    model = build_model(tiny_config())
    _save_step(Path(root), model, 1)

    def die(tmp: Path) -> None:  # the weights and state of step 2 are on disk, the folder is not renamed yet
        assert (tmp / "model.safetensors").is_file()
        os.kill(os.getpid(), signal.SIGKILL)

    with torch.no_grad():
        model.embed_tokens.weight[0, 0] = 2.0
    save_checkpoint(Path(root) / "latest", model, trainer_state={"step": 2}, write_extra=die)


def test_sigkill_inside_a_save_leaves_only_an_ignored_tmp_folder(tmp_path):
    child = FORK.Process(target=_kill_inside_save, args=(str(tmp_path),))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    (half,) = atomic.leftovers(tmp_path / "latest", ".tmp-")
    assert (half / "model.safetensors").is_file() and (half / "config.json").is_file()
    assert _check_consistent(tmp_path) == 1  # the parent folder resolves to the complete latest/
    with pytest.raises(CheckpointError, match="half-written"):
        read_checkpoint(half)  # even named directly, a .tmp- folder is not taken for a checkpoint
    _save_step(tmp_path, build_model(tiny_config()), 3)
    assert not half.exists() and _check_consistent(tmp_path) == 3


def _kill_between_renames(root: str) -> None:
    model = build_model(tiny_config())
    _save_step(Path(root), model, 1)
    atomic._exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE: the two-rename swap
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name:  # latest/ has been moved aside; die before the new one goes in
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    atomic.os.replace = replace
    _save_step(Path(root), model, 2)


def test_sigkill_between_the_two_renames_keeps_the_old_folder_reachable(tmp_path):
    child = FORK.Process(target=_kill_between_renames, args=(str(tmp_path),))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert not (tmp_path / "latest").exists() and atomic.leftovers(tmp_path / "latest", ".old-")
    assert _check_consistent(tmp_path) == 1  # readers find the moved-aside folder
    _save_step(tmp_path, build_model(tiny_config()), 3)  # the next save puts it back, then replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    assert _check_consistent(tmp_path) == 3


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["weights", "optimizer_state", "final_rename", "exchange"])
def test_full_disk_gives_one_line_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, where):
    model = build_model(tiny_config())
    _save_step(tmp_path, model, 1)
    if where == "weights":
        monkeypatch.setattr("llmlab.checkpoint.save_file", _enospc)
    elif where == "optimizer_state":
        def torch_save(obj, f, *a, **k):  # what torch.save raises when the disk fills mid-write
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed "
                               "writing file data/0: file write failed")
        monkeypatch.setattr("llmlab.checkpoint.torch.save", torch_save)
    elif where == "final_rename":
        real = os.replace

        def replace(src, dst):
            if ".tmp-" in Path(src).name:
                _enospc()
            real(src, dst)

        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        monkeypatch.setattr(atomic.os, "replace", replace)
    else:
        monkeypatch.setattr(atomic, "_exchange", _enospc)
    with pytest.raises(CheckpointWriteError) as info:
        _save_step(tmp_path, model, 2)
    message = str(info.value)
    assert isinstance(info.value, LLMLabError) and isinstance(info.value, OSError)
    assert "\n" not in message and "latest" in message and "cannot write the checkpoint" in message
    if where != "optimizer_state":
        assert "free disk space" in message and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # nothing half-written left behind
    assert _check_consistent(tmp_path) == 1


def test_other_runtime_errors_in_a_save_are_not_disguised(tmp_path):
    def bug(_tmp):
        raise RuntimeError("a bug in a stage's write_extra")

    with pytest.raises(RuntimeError, match="a bug in"):
        save_checkpoint(tmp_path / "latest", build_model(tiny_config()), write_extra=bug)
    assert list(tmp_path.iterdir()) == []


def test_resolve_prefers_complete_folders_over_leftovers(tmp_path):
    save_checkpoint(tmp_path / "best", build_model(tiny_config()), trainer_state={"step": 5})
    junk = tmp_path / ".best.tmp-999999-x"  # a dead writer's half folder with a config but torn weights
    junk.mkdir()
    (junk / "config.json").write_text((tmp_path / "best" / "config.json").read_text())
    (junk / "model.safetensors").write_bytes(b"\0" * 10)
    assert resolve_checkpoint(tmp_path) == tmp_path / "best"
    assert resolve_checkpoint(tmp_path / "best_model.pt") == tmp_path / "best"
    save_checkpoint(tmp_path / "best", build_model(tiny_config()), trainer_state={"step": 6})
    assert not junk.exists()  # pid 999999 is not running: its leftover is removed by the next save


def test_saved_files_and_folders_follow_the_umask_not_tempfiles_private_modes(tmp_path):
    # mkstemp/mkdtemp make 0600/0700; a checkpoint must be readable like any file the user writes (0644/0755
    # under the usual umask 022), e.g. by a serving process or a colleague on a shared cluster
    save_checkpoint(tmp_path / "best", build_model(tiny_config()), trainer_state={"step": 1})
    atomic.atomic_write_text(tmp_path / "run_state.json", "{}")
    files = [tmp_path / "run_state.json", tmp_path / "best" / "model.safetensors", tmp_path / "best" / "config.json",
             tmp_path / "best" / "trainer_state.json"]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK, f
    assert (tmp_path / "best").stat().st_mode & 0o777 == 0o777 & ~atomic._UMASK
