"""Shared helpers of the foundation benchmarks: a quiet, single-threaded torch; interleaved repeats; medians; tables.

Import this module before torch: it sets `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP threads sleep instead of spinning on
cores other processes need) and, in `setup_torch()`, `torch.set_num_threads(1)`. On a machine shared with other
workers a multi-threaded run measures the neighbours as much as the code; one thread measures the code.

Every comparison runs ours and the peer in one process, alternating (ours, peer, ours, peer, ...), and reports the
ratio of the medians: slow drifts in machine load then hit both sides alike, on a line of its own that starts with
`ratio ` (`ratio_line`). Every script has `--quick` (tiny model, a few steps, one repeat): a smoke run that checks the
script still works end to end (tests/benchmarks/test_quick.py runs each); its ratio is a single noisy sample.

Our recipes are measured from outside: `run_recipe` calls a recipe's `run(cfg, ctx)` as the pipeline does and reads
its own `perf/step_seconds` rows back from metrics.jsonl; nothing inside a recipe is patched.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TOKENIZER = REPO / "data" / "demo" / "tokenizer"
EVAL_PROMPTS = REPO / "data" / "demo" / "eval_prompts.jsonl"
SFT_DATA = REPO / "data" / "demo" / "sft.jsonl"


def setup_torch(threads: int = 1):
    """Import torch with `threads` intra-op threads (and 1 inter-op thread). Returns the torch module."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (torch allows it once per process)
        pass
    return torch


def environment(threads: int) -> str:
    """One line naming what the numbers were measured on."""
    import torch

    return (
        f"{time.strftime('%Y-%m-%d %H:%M')} | {platform.node()} | {os.cpu_count()} CPU cores visible (shared) | "
        f"torch {torch.__version__}, torch.set_num_threads({threads}), OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )


def interleaved(runs: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Call each function in `runs` once per repeat, alternating in order: a, b, a, b, ...

    Each call returns a dict of measurements; the lists of those dicts come back per name.
    """
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, fn in runs.items():
            out = fn()
            results[name].append(out)
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items())
            print(f"  repeat {r + 1}/{repeats} {name:>6}: {shown}", flush=True)
    return results


def run_recipe(kind: str, cfg) -> dict[int, dict]:
    """Run stage kind `kind`'s recipe on `cfg` into the (new) directory `cfg.output_dir`; returns its metrics.jsonl
    rows that carry `perf/step_seconds`, by step.

    The recipe is called through its public entry point, `run(cfg, ctx)`, exactly as `rlhf.pipeline.run_stage` calls
    it (minus the manifest). The tracker it is handed also writes `bench/cpu_seconds` (this process's
    `time.process_time()`) into every row it logs: with `train.log_every=1` a recipe logs right after timing each
    optimizer step, so row-to-row differences are CPU seconds per step, next to its wall-clock `perf/step_seconds`.
    """
    from rlhf.pipeline import recipe
    from rlhf.stage import StageContext
    from rlhf.tracking import Tracker, read_metrics

    class CpuNotingTracker(Tracker):
        def log(self, metrics: dict, step: int) -> None:
            super().log({**metrics, "bench/cpu_seconds": time.process_time()}, step)

    if cfg.train.log_every != 1:
        raise ValueError("run_recipe needs train.log_every=1 (one timed row per step)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    tracker = CpuNotingTracker(out, cfg.tracking, job_type=kind, name=kind)
    try:
        recipe(kind).run(cfg, StageContext(name=kind, kind=kind, dir=out, tracker=tracker))
    finally:
        tracker.finish()
    return {row["step"]: row for row in read_metrics(out) if "perf/step_seconds" in row}


def step_window(rows: dict[int, dict], warmup: int, steps: int) -> dict[str, float]:
    """Wall seconds, CPU seconds, tokens and samples of steps warmup+1 .. warmup+steps of `run_recipe`'s rows."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first step includes one-time setup, and the window needs a start")
    first, last = rows[warmup], rows[warmup + steps]
    return {
        "seconds": sum(rows[s]["perf/step_seconds"] for s in range(warmup + 1, warmup + steps + 1)),
        "cpu_seconds": last["bench/cpu_seconds"] - first["bench/cpu_seconds"],
        "tokens": last["progress/tokens"] - first["progress/tokens"],
        "samples": last["progress/samples"] - first["progress/samples"],
    }


def ratio_line(what: str, wall: float, cpu: float | None = None, note: str = "") -> str:
    """The result line every comparison prints last, e.g. `ratio ours/TRL tokens/s: 1.180 wall, 1.176 per CPU-s`.

    tests/benchmarks/test_quick.py looks for it: `ratio <ours/peer> <quantity>: <number> wall`."""
    line = f"ratio {what}: {wall:.3f} wall"
    if cpu is not None:
        line += f", {cpu:.3f} per CPU-s"
    return line + (f" ({note})" if note else "")


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def spread(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows]
    return f"{min(values):.4g}..{max(values):.4g}"


def table(header: list[str], rows: list[list]) -> str:
    """A small fixed-width text table (also valid Markdown)."""
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])
