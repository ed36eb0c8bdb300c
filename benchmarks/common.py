"""Shared helpers of the foundation benchmarks: a quiet, single-threaded torch; interleaved repeats; medians; tables.

Import this module before torch: it sets `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP threads sleep instead of spinning on
cores other processes need) and, in `setup_torch()`, `torch.set_num_threads(1)`. On a machine shared with other
workers a multi-threaded run measures the neighbours as much as the code; one thread measures the code.

Every comparison runs ours and the peer in one process, alternating (ours, peer, ours, peer, ...), and reports the
ratio of the medians: slow drifts in machine load then hit both sides alike.
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
