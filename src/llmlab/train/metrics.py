"""What a training run shows and records: progress bar, `metrics.jsonl`, TensorBoard, `loss.png`.

    tensorboard --logdir checkpoints/tensorboard

`metrics.jsonl` holds one JSON object per logged step: `step`, `loss`, `lr`, `grad_norm`,
`tokens_per_sec`, `tokens_seen`, `elapsed_s` and, on evaluation steps, `val_loss`, `val_ppl` and
`val_tokens` (an evaluation step that is not a log step gets a line with the validation numbers only).
`loss` is the mean over the steps since the previous log line. Under `nan_policy=skip`, `nan_skips` counts
the skipped updates and a skipped step logged on its own has `"skipped": true` and no loss; a data iterator
that counts skipped records adds `skipped_invalid` / `skipped_empty` (summed over ranks); RLHF adds its own
numbers (reward, kl, ...). TensorBoard gets every number of a record: `val_*` under `val/*`, the rest under
the logger's prefix (`train/*`, `rlhf/*`). On resume, lines after the resumed step are dropped first (they
came from the part of a run that is being redone) and TensorBoard purges them too.

The progress bar (rich) shows step, loss, lr, grad norm, tokens/s, the logger's extra fields (RLHF: reward
and KL) and ETA. It is drawn only on a TTY and when `progress=True`; otherwise each log step prints one
plain line (and each evaluation one line of its `val_*` numbers), unless `progress=False`, which drops the bar
and the per-step lines (tests; setup lines, notices and the last line still print). Only rank 0 writes anything.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TB_DIR = "tensorboard"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of `{output_dir}/metrics.jsonl` (an unreadable trailing line is skipped)."""
    p = Path(output_dir) / METRICS_FILE
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the records with step <= `step` (a resumed run redoes the rest)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path.parent) if int(r.get("step", 0)) <= step]
    from llmlab.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(path: str | Path, records: list[dict[str, Any]], curves: dict[str, str], *,
                xlabel: str = "step", ylabel: str | None = None) -> Path | None:
    """Write a PNG of `records`' keys against their step, one curve per key of `curves` (key -> legend
    label); validation keys (`val_*`, logged only at evaluations) get markers. None if no key has data."""
    series = {}
    for key in curves:
        points = [(r["step"], r[key]) for r in records
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            series[key] = points
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key, points in series.items():
        ax.plot(*zip(*points), "o-" if key.startswith("val_") else "-", label=curves[key], linewidth=1.2,
                markersize=4)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_losses(output_dir: str | Path, records: list[dict[str, Any]] | None = None) -> Path | None:
    """Write `loss.png` (train and validation loss against step) from metrics.jsonl; None if no data."""
    output_dir = Path(output_dir)
    records = read_metrics(output_dir) if records is None else records
    return plot_curves(output_dir / PLOT_FILE, records, {"loss": "train loss", "val_loss": "validation loss"},
                       xlabel="step (optimizer updates)", ylabel="cross entropy (nats/token)")


class _Bar:
    """rich progress bar with the run's numbers as fields (the standard ones, then `extra` record keys).

    A terminal narrower than the whole line (~100 columns, more with extra fields) drops the stage name
    and the bar itself: rich would otherwise squeeze every column and cut the step count and the ETA
    ("120…", "0:00:…") on an 80-column terminal."""

    WIDE = 100  # columns the full line takes with 6-digit step counts, before extra fields
    EXTRA = 14  # columns per extra field

    def __init__(self, total: int, start: int, description: str, extra: Sequence[str] = (),
                 console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = console or Console()
        wide = console.width >= self.WIDE + self.EXTRA * len(extra)
        head = (TextColumn("[bold]{task.description}"), BarColumn(bar_width=20)) if wide else ()
        self.progress = Progress(
            *head, MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("gnorm {task.fields[gnorm]}"), TextColumn("{task.fields[tps]} tok/s"),
            *(TextColumn(f"{key} {{task.fields[{key}]}}") for key in extra),
            TextColumn("ETA"), TimeRemainingColumn(), refresh_per_second=4, transient=False, console=console)
        self.task = self.progress.add_task(description, total=total, completed=start, loss="-", lr="-",
                                           gnorm="-", tps="-", **dict.fromkeys(extra, "-"))
        self.progress.start()

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def fields(self, **kw: str) -> None:
        self.progress.update(self.task, **kw)

    def print(self, msg: str) -> None:
        self.progress.console.print(msg, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


VAL_PREFIX = "val_"
_VAL_FORMATS = {"val_ppl": ".2f"}


class MetricsLogger:
    """Rank 0's sink for per-step numbers. Create with `enabled=False` on other ranks (does nothing).

    `extra_fields`: record keys shown on the progress bar (and the plain per-step line) after loss, lr,
    grad norm and tokens/s, e.g. ("reward", "kl") for RLHF. `tb_prefix`: the TensorBoard section of the
    record's numbers (`train`, `rlhf`); `val_*` keys go to `val/*` whatever the prefix."""

    def __init__(self, output_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, description: str = "train", extra_fields: Sequence[str] = (),
                 tb_prefix: str = "train") -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.quiet = not progress
        self.extra_fields = tuple(extra_fields)
        self.tb_prefix = tb_prefix
        self._bar: _Bar | None = None
        self._writer = None
        self._file = None
        self._start_time = time.perf_counter()
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / METRICS_FILE
        _truncate_after(path, start_step)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir / TB_DIR), purge_step=start_step + 1)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self._writer = None
        if progress and sys.stdout.isatty():
            self._bar = _Bar(total_steps, start_step, description, self.extra_fields)

    def advance(self, step: int) -> None:
        """Move the bar (no numbers, so no synchronisation needed)."""
        if self._bar is not None:
            self._bar.advance(step)

    def tb_tag(self, key: str) -> str:
        """The TensorBoard tag of a record key: `val_x` -> `val/x`, anything else -> `{tb_prefix}/key`."""
        if key.startswith(VAL_PREFIX):
            return f"val/{key.removeprefix(VAL_PREFIX)}"
        return f"{self.tb_prefix}/{key}"

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold `step`) to metrics.jsonl and every finite number in it to
        TensorBoard; refresh the display."""
        if not self.enabled:
            return
        record = {k: v for k, v in record.items() if v is not None}
        record.setdefault("elapsed_s", round(time.perf_counter() - self._start_time, 3))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        if self._writer is not None:
            for key, v in record.items():
                if key != "step" and _is_number(v) and math.isfinite(v):
                    self._writer.add_scalar(self.tb_tag(key), v, step)
        if "loss" in record:
            fields = dict(loss=_fmt(record.get("loss")), lr=_fmt(record.get("lr"), ".2e"),
                          gnorm=_fmt(record.get("grad_norm"), ".3f"), tps=_fmt(record.get("tokens_per_sec"), ",.0f"))
            extra = {k: _fmt(record[k]) for k in self.extra_fields if k in record}
            if self._bar is not None:
                self._bar.fields(**fields, **extra)
            elif not self.quiet:
                print(f"step {step} | loss {fields['loss']} | lr {fields['lr']} | grad norm {fields['gnorm']} | "
                      f"{fields['tps']} tok/s" + "".join(f" | {k} {v}" for k, v in extra.items()), flush=True)
        val = {k: v for k, v in record.items() if k.startswith(VAL_PREFIX) and isinstance(v, float)}
        if val:
            self.message(f"step {step} | " + " | ".join(f"{k.replace('_', ' ')} {_fmt(v, _VAL_FORMATS.get(k, '.4f'))}"
                                                        for k, v in val.items()))

    def message(self, msg: str, *, always: bool = False) -> None:
        """A line for the user, above the bar when there is one (printed even when quiet if `always`)."""
        if not self.enabled or (self.quiet and not always):
            return
        if self._bar is not None:
            self._bar.print(msg)
        else:
            print(msg, flush=True)

    def close(self, *, plot: bool = True) -> Path | None:
        """Stop the bar, close the files, write loss.png; returns the plot path (None if nothing to plot)."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return plot_losses(self.output_dir) if plot else None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)
