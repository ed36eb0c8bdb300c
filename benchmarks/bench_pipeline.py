"""Wall time of the demo pipeline, per stage and in total, as a user runs it.

Runs `rlhf run configs/demo/pipeline.yaml output_dir=<temp dir> tracking.mode=disabled` as a subprocess (there is
no peer to interleave with: this is an absolute number, not a ratio), then prints for every stage the `seconds`
field of its `manifest.json` (the runner's `time.monotonic()` around the stage's `run`: model load, data,
training, final evaluation and save; not process start-up or imports), the sum over stages, the subprocess's
whole wall time (start-up and imports included), and the gold-score table the eval stage printed (re-rendered from
`eval/results.json` with the stage's own `format_table`).

The subprocess gets `OMP_WAIT_POLICY=PASSIVE` and `OMP_NUM_THREADS=--threads` (default 1, which torch reads as
its intra-op thread count), so the number is comparable with the other benchmarks on a shared machine.

    python benchmarks/bench_pipeline.py            # the demo pipeline as configured (a few minutes)
    python benchmarks/bench_pipeline.py --quick    # 30 pretrain + 30 SFT steps, 32 eval prompts (smoke run)
    python benchmarks/bench_pipeline.py --keep runs/bench-demo   # keep the artifacts there instead of a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

PIPELINE = common.REPO / "configs" / "demo" / "pipeline.yaml"
QUICK = ["pretrain.train.max_steps=30", "sft.train.max_steps=30", "sft.data.gold_limit=32", "eval.limit=32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (" + " ".join(QUICK) + ")")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the run (torch intra-op threads)")
    parser.add_argument("--keep", metavar="DIR", help="write the pipeline's artifacts here and keep them")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides passed to `rlhf run`")
    args = parser.parse_args()

    import yaml

    stages = [s["name"] for s in yaml.safe_load(PIPELINE.read_text())["stages"]]
    tmp = None
    if args.keep:
        out = Path(args.keep).resolve()
    else:
        tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
        out = Path(tmp) / "demo"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "rlhf.cli", "run", str(PIPELINE), f"output_dir={out}", "tracking.mode=disabled",
           *(QUICK if args.quick else []), *args.overrides]
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {os.cpu_count()} CPU cores visible (shared) | "
          f"OMP_NUM_THREADS={args.threads}, OMP_WAIT_POLICY=PASSIVE")
    print("$ rlhf " + " ".join(cmd[3:]))
    log = (Path(tmp) if tmp else out.parent) / "bench-pipeline.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with log.open("w") as f:
            rc = subprocess.run(cmd, cwd=common.REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = time.monotonic() - started
        if rc != 0:
            print(log.read_text()[-4000:])
            raise SystemExit(f"the pipeline failed (exit {rc}); full log above")

        rows, total = [], 0.0
        for name in stages:
            manifest = json.loads((out / name / "manifest.json").read_text())
            rows.append([name, manifest["kind"], manifest["status"], manifest["seconds"]])
            total += manifest["seconds"]
        rows.append(["total (stages)", "", "", round(total, 2)])
        rows.append(["total (process)", "", "", round(wall, 2)])
        print("\nwall time per stage (manifest.json `seconds`):")
        print(common.table(["stage", "kind", "status", "seconds"], rows))

        from rlhf.recipes.evaluate import format_table

        eval_dirs = [out / n for n in stages if json.loads((out / n / "manifest.json").read_text())["kind"] == "eval"]
        for d in eval_dirs:
            print(f"\neval table ({d.name}):")
            print(format_table(json.loads((d / "results.json").read_text())))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
