"""Experiment tracking: W&B (offline unless an API key is set) plus an always-written metrics.jsonl, and
progress bars that degrade to plain log lines when stderr is not a terminal."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

from rlhf.config import TrackingSettings
from rlhf.stage import atomic_write

log = logging.getLogger("rlhf")

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # sampled completions of RL stages, one JSON object a line
X_AXES = ("progress/samples", "progress/tokens", "progress/seconds")


def resolve_mode(mode: str) -> str:
    """auto -> online when a W&B key is configured, offline otherwise (no network needed)."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Writes every metric to `<dir>/metrics.jsonl` and, unless disabled, to a W&B run.

    On resume, metrics.jsonl is cut back to `resume_step` so the file reads as one uninterrupted run.
    """

    def __init__(
        self,
        directory: str | Path,
        settings: TrackingSettings,
        *,
        job_type: str,
        name: str,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
    ):
        self.dir = Path(directory)
        self.enabled = enabled  # False on non-main processes under accelerate
        self.path = self.dir / METRICS_FILE
        self.run = None
        if not enabled:
            return
        self._truncate(self.path, resume_step)
        self._truncate(self.dir / SAMPLES_FILE, resume_step, keep_missing=True)
        mode = resolve_mode(settings.mode)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=settings.project,
                group=settings.group,
                job_type=settings.job_type or job_type,
                name=settings.run_name or name,
                dir=str(self.dir),
                config={**(config or {}), **settings.run_config},
                mode=mode,
                reinit="create_new",
            )
            for axis in X_AXES:
                self.run.define_metric(axis)
            self.run.define_metric("*", step_metric="progress/samples")

    @staticmethod
    def _truncate(path: Path, resume_step: int | None, keep_missing: bool = False) -> None:
        """Empty `path`, or on resume keep only its rows up to `resume_step`."""
        if not path.exists() or resume_step is None:
            if not keep_missing or path.exists():
                atomic_write(path, "")
            return
        kept = [line for line, row in _rows(path) if row.get("step", 0) <= resume_step]
        atomic_write(path, "".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record `metrics` (tensors become floats) at optimizer step `step`."""
        if not self.enabled:
            return
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **clean}) + "\n")
        if self.run is not None:
            self.run.log(clean, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """Sampled completions (dicts with the same keys) at step `step`: appended to samples.jsonl and logged as a
        W&B table `samples`."""
        if not self.enabled or not rows:
            return
        with (self.dir / SAMPLES_FILE).open("a") as fh:
            fh.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
        if self.run is not None:
            import wandb

            columns = list(rows[0])
            self.run.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(directory: str | Path) -> list[dict]:
    """The rows of `<dir>/metrics.jsonl`."""
    return [row for _, row in _rows(Path(directory) / METRICS_FILE)]


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of each JSON row of a .jsonl file this module appends to, leaving out a line a kill or a full
    disk cut off."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", initial: int = 0) -> Iterator:
    """A tqdm bar with ETA on a terminal; elsewhere (CI, log files) a plain line about every 10%."""
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True)
    return _plain_progress(iterable if iterable is not None else range(initial, total or 0), total, desc, initial)


def _plain_progress(iterable: Iterable, total: int | None, desc: str, initial: int) -> Iterator:
    start, done = time.monotonic(), initial
    every = max(1, (total or 10) // 10)
    for item in iterable:
        yield item
        done += 1
        if total and (done % every == 0 or done == total):
            elapsed = time.monotonic() - start
            rate = (done - initial) / elapsed if elapsed > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else 0.0
            print(f"{desc} {done}/{total} [{elapsed:.0f}s elapsed, ETA {eta:.0f}s]", file=sys.stderr, flush=True)
