"""GRPO throughput on 2 cores: the synchronous loop (2 threads) vs asynchronous rollouts (`rl.asynchronous`, trainer
and rollout worker one thread each, max_staleness 1) vs TRL's `GRPOTrainer` (2 threads), the same model, prompts
and step as `bench_grpo.py` (its configs and its TRL side are reused as they are).

Runs alternate (sync, async, TRL, sync, ...) in one process, each a fresh trainer; timed = the steps after the
warm-up, samples/s = P × G completions per step over their wall-clock seconds (ours: the recipe's own
`perf/step_seconds`, which for the async loop includes waiting for the worker; TRL: the laps between its step
ends). Reported: the medians, and the ratios async/sync and async/TRL (the last line).

    python benchmarks/bench_async.py            # demo "small" model, P=2, G=8, N=32, 2 warm-up + 8 timed steps, 3 repeats
    python benchmarks/bench_async.py --quick    # nano model, 1 warm-up + 2 timed steps, 1 repeat, no TRL
    python benchmarks/bench_async.py --model models/smollm2-135m-instruct   # real model: P=8, G=8, N=24, LoRA 16, M=16
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import bench_grpo
import common

torch = bench_grpo.torch


def run_ours(model_dir: Path, prompts: Path, out: Path, shape, warmup: int, steps: int, *, staleness: int | None,
             threads: int) -> dict:
    from rlhf.config import AsyncSettings

    torch.set_num_threads(threads)
    cfg = bench_grpo.grpo_config(model_dir, prompts, out, shape, warmup + steps)
    if staleness is not None:
        cfg.rl.asynchronous = AsyncSettings(max_staleness=staleness, worker_threads=1)
    rows = common.run_recipe("grpo", cfg)
    window = common.step_window(rows, warmup, steps)
    return {"samples_per_s": window["samples"] / window["seconds"], "step_seconds": window["seconds"] / steps}


def run_trl(model_dir: Path, prompts: Path, out: Path, shape, warmup: int, steps: int) -> dict:
    torch.set_num_threads(2)
    result = bench_grpo.quietly(bench_grpo.run_trl)(model_dir, prompts, out, shape, warmup, steps)
    return {"samples_per_s": result["samples_per_s"], "step_seconds": result["step_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", type=Path, help="a Hugging Face causal-LM directory (real model)")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    if args.model:
        shape, warmup, steps, repeats = bench_grpo.Shape(8, 8, 24, micro=16, lora=16, task="chat_add"), 1, 2, 2
    elif args.quick:
        shape, warmup, steps, repeats = bench_grpo.Shape(2, 4, 8), 1, 2, 1
    else:
        shape, warmup, steps, repeats = bench_grpo.Shape(2, 8, 32), 2, 8, 3
    repeats = args.repeats or repeats
    bench_grpo.install_probes()
    print(common.environment(2))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model:
            model_dir = args.model
            prompts = bench_grpo.CHAT_PROMPTS
        else:
            model_dir, _ = bench_grpo.build_model(root / "model", "nano" if args.quick else "small")
            prompts = bench_grpo.write_prompts(root / "prompts.jsonl", 64)
        count = iter(range(10**6))
        arms = {
            "sync": lambda: run_ours(model_dir, prompts, root / f"r{next(count)}", shape, warmup, steps,
                                     staleness=None, threads=2),
            "async": lambda: run_ours(model_dir, prompts, root / f"r{next(count)}", shape, warmup, steps,
                                      staleness=1, threads=1),
        }
        if not args.quick:
            arms["TRL"] = lambda: run_trl(model_dir, prompts, root / f"r{next(count)}", shape, warmup, steps)
        print(f"shape: {dataclasses.asdict(shape)}, {warmup} warm-up + {steps} timed steps, {repeats} repeats")
        results = common.interleaved(arms, repeats)
    med = {name: common.median(rows, "samples_per_s") for name, rows in results.items()}
    print(common.table(["arm", "samples/s (median)", "range", "step s (median)"],
                       [[name, f"{med[name]:.2f}", common.spread(rows, "samples_per_s"),
                         f"{common.median(rows, 'step_seconds'):.2f}"] for name, rows in results.items()]))
    print(common.ratio_line("async/sync samples/s", med["async"] / med["sync"]))
    if "TRL" in med:
        print(common.ratio_line("async/TRL samples/s", med["async"] / med["TRL"]))


if __name__ == "__main__":
    main()
