"""benchmarks/bench_grpo.py can still be re-measured: its `--quick` smoke run (nano model, 2 prompts, G = 4, 8 new
tokens, one repeat) completes and prints what the GRPO comparison reports: the per-phase table of both sides, the
peak-RSS ratio from the one-side-per-process children, and last the samples/s ratio line. The numbers of a quick run
are single noisy samples: only that they are there, finite and positive is checked. About 50 s on a loaded 2-core
machine (a subprocess: the script sets its own thread and OpenMP settings before importing torch).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"(\d+(?:\.\d+)?)"
RATIO_LINE = rf"^ratio ours/TRL samples/s: {NUMBER} wall, {NUMBER} per CPU-s"
RSS_LINE = rf"^peak RSS ours/TRL: {NUMBER}"
PHASES = ("generate", "score", "reference", "policy_fwd_bwd", "optimizer", "other")


def test_quick_run_prints_phases_rss_and_the_ratio_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_grpo.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"bench_grpo.py --quick failed (exit {proc.returncode}):\n{(out + proc.stderr)[-4000:]}"

    ratio = re.match(RATIO_LINE, out.rstrip().splitlines()[-1])
    assert ratio, f"the last line does not match {RATIO_LINE!r}:\n{out[-4000:]}"
    rss = re.search(RSS_LINE, out, re.MULTILINE)
    assert rss, f"no line matching {RSS_LINE!r}:\n{out[-4000:]}"
    values = [float(v) for v in ratio.groups() + rss.groups()]
    assert all(math.isfinite(v) and v > 0 for v in values), (ratio.group(0), rss.group(0))

    for phase in PHASES:  # | phase | ours seconds (share) | TRL seconds (share) | ours/TRL |
        assert re.search(rf"^\| {phase} +\| -?{NUMBER} \(-?\d+%\) +\| -?{NUMBER} \(-?\d+%\)", out, re.MULTILINE), phase
