"""Every benchmark can still be re-measured: each script's `--quick` smoke run (tiny model, a few steps, one repeat)
completes and prints its result line. The numbers of a quick run are single noisy samples and are not checked,
only that they are there and positive.

Each run is a subprocess (the scripts set their own thread and OpenMP settings before importing torch) and takes
about 15-55 s on the 2-core development machine under a load average of 5-8; bench_grpo.py's quick run took 53-67 s
there and bench_fsdp_memory.py's (three launches) 45 s, so they are marked slow (run them with `pytest -m slow tests/benchmarks`).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"(\d+(?:\.\d+)?)"
# script -> the result line it prints last (common.ratio_line: `ratio <ours/peer> <quantity>: <wall> wall, <cpu> per CPU-s`)
RESULT_LINES = {
    "bench_generate.py": rf"^ratio ours/raw tokens/s \[tiny\]: {NUMBER} wall, {NUMBER} per CPU-s",
    "bench_sft.py": rf"^ratio ours/TRL tokens/s: {NUMBER} wall, {NUMBER} per CPU-s",
    "bench_reward.py": rf"^ratio ours/TRL pairs/s: {NUMBER} wall, {NUMBER} per CPU-s",
    "bench_grpo.py": rf"^ratio ours/TRL samples/s: {NUMBER} wall, {NUMBER} per CPU-s",
    "bench_ppo.py": rf"^ratio ppo_lora/sft_lora peak RSS: {NUMBER}",
    "bench_async.py": rf"^ratio async/sync samples/s: {NUMBER} wall",
    "bench_fsdp_memory.py": rf"^\| demo nano pretrain \| 2 processes FSDP2 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|",
    # no peer: the pipeline's result is an absolute time
    "bench_pipeline.py": rf"^total demo pipeline \(--quick\): {NUMBER} s in stages, {NUMBER} s process",
}

# quick runs over a minute on the loaded 2-core machine: `slow`, outside the default `-m "not slow"` suite
SLOW = {"bench_grpo.py", "bench_fsdp_memory.py"}
# benchmark scripts without a --quick smoke run yet (each should get one, and an entry above)
NO_QUICK_YET = {"bench_collect.py"}


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {path.name for path in (ROOT / "benchmarks").glob("bench_*.py")}
    assert scripts - NO_QUICK_YET == set(RESULT_LINES), "add the new script's --quick result line to RESULT_LINES"


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in RESULT_LINES])
def test_quick_run_prints_its_result_line(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --quick failed (exit {proc.returncode}):\n{output[-4000:]}"
    match = re.search(RESULT_LINES[script], proc.stdout, re.MULTILINE)
    assert match, f"{script} --quick printed no line matching {RESULT_LINES[script]!r}:\n{proc.stdout[-4000:]}"
    values = [float(v) for v in match.groups()]
    assert all(math.isfinite(v) and v > 0 for v in values), match.group(0)
