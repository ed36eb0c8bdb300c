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
    python benchmarks/bench_pipeline.py --quick    # smoke run: every stage, a few steps each (QUICK below)
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
import yaml

PIPELINE = common.REPO / "configs" / "demo" / "pipeline.yaml"
# --quick: every stage of the pipeline runs, tiny and short; the overrides per stage kind (each stage named so gets
# them as `<stage>.<key>=<value>`), plus pretraining on the first QUICK_DOCS documents of its corpus
QUICK: dict[str, dict[str, object]] = {
    "pretrain": {"train.max_steps": 5, "train.batch_size": 8, "train.eval_every": 0, "train.save_every": 0},
    "sft": {"train.max_steps": 5, "train.save_every": 0, "data.gold_limit": 8},
    "reward": {"data.sample.num_prompts": 16, "data.sample.samples_per_prompt": 4, "train.max_steps": 5,
               "train.save_every": 0, "stats.num_samples": 32},
    "grpo": {"train.max_steps": 2, "train.save_every": 0, "rl.prompts_per_step": 4, "sampling.n": 4,
             "sampling.max_new_tokens": 16, "eval.limit": 8, "samples_every": 0},
    "ppo": {"train.max_steps": 2, "train.save_every": 0, "train.eval_every": 0, "rl.prompts_per_step": 4, "sampling.n": 2,
            "sampling.max_new_tokens": 16, "eval.limit": 8, "samples_every": 0},
    "dpo": {"train.max_steps": 2, "train.save_every": 0, "train.eval_every": 0},
    "eval": {"limit": 8, "generation.samples": 2},
}
QUICK_DOCS = 400


def quick_overrides(stages: list[dict], scratch: Path) -> list[str]:
    """`--quick`'s overrides for these pipeline stages; pretraining reads a short copy of its corpus in `scratch`."""
    overrides = []
    for stage in stages:
        if stage["kind"] not in QUICK:
            raise SystemExit(f"--quick: no short settings for stage kind '{stage['kind']}' (stage '{stage['name']}'); "
                             "add them to QUICK in benchmarks/bench_pipeline.py")
        overrides += [f"{stage['name']}.{key}={value}" for key, value in QUICK[stage["kind"]].items()]
        if stage["kind"] == "pretrain":
            corpus = scratch / f"{stage['name']}-quick.jsonl"
            corpus.parent.mkdir(parents=True, exist_ok=True)
            source = common.REPO / yaml.safe_load((common.REPO / stage["config"]).read_text())["data"]["train"]
            corpus.write_text("".join(source.read_text().splitlines(keepends=True)[:QUICK_DOCS]))
            overrides.append(f"{stage['name']}.data.train={corpus}")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: every stage, tiny and short (see QUICK in the source)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the run (torch intra-op threads)")
    parser.add_argument("--keep", metavar="DIR", help="write the pipeline's artifacts here and keep them")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides passed to `rlhf run`")
    args = parser.parse_args()

    spec = yaml.safe_load(PIPELINE.read_text())
    stages = [s["name"] for s in spec["stages"]]
    tmp = None
    if args.keep:
        out = Path(args.keep).resolve()
    else:
        tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
        out = Path(tmp) / "demo"
    quick = quick_overrides(spec["stages"], out.parent if args.keep else Path(tmp)) if args.quick else []
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "rlhf.cli", "run", str(PIPELINE), f"output_dir={out}", "tracking.mode=disabled",
           *quick, *args.overrides]
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
        # no peer to divide by: the result line is the absolute time (the other scripts print `ratio ...` here)
        print(f"total demo pipeline{' (--quick)' if args.quick else ''}: {total:.1f} s in stages, {wall:.1f} s process")

        from rlhf.recipes.evaluate import format_table

        eval_dirs = [out / n for n in stages if json.loads((out / n / "manifest.json").read_text())["kind"] == "eval"]
        for d in eval_dirs:
            print(f"\neval table ({d.name}):")
            results = json.loads((d / "results.json").read_text())
            print(format_table(results.get("metrics", results)))  # {"metrics": {label: ...}, ...}; older: {label: ...}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
