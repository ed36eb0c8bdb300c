"""Peak memory per process: one process vs two under DDP vs two under FSDP2, the same global batch.

Each workload runs as a stage from the command line (`rlhf <stage> CONFIG overrides`, under `accelerate launch` for
the two-process engines) and reports what the stage logs itself: `perf/peak_rss_gb` (the largest peak resident
memory over the processes, model loading included), the median `perf/step_seconds` and the last `loss/total`.

Workloads: the demo world's largest model (`small`) pre-trained from scratch; SmolLM2-135M-Instruct fully fine-tuned
(SFT, no LoRA: weights, gradients and AdamW state are what FSDP shards); GRPO on SmolLM2-135M (full parameters:
rollouts sample from a gathered whole copy of the weights, the reference is sharded). SmolLM2 needs
`rlhf import-model smollm2-135m-instruct models/smollm2-135m-instruct` first; its workloads are skipped without it.

    python benchmarks/bench_fsdp_memory.py            # every workload, three launches each
    python benchmarks/bench_fsdp_memory.py --quick    # the demo world's nano model, two steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "models" / "smollm2-135m-instruct"
# (processes, accelerate config); one process runs without accelerate launch
LAUNCHES = {"1 process": (1, None), "2 processes DDP": (2, "ddp"), "2 processes DDP, FSDP's malloc setting": (2, "ddp"),
            "2 processes FSDP2": (2, "fsdp")}
# under FSDP on CPU rlhf fixes glibc's mmap threshold (rlhf.distributed._return_large_frees_to_the_os): the same
# setting for DDP, through glibc's environment variable, shows what is the engine's and what the allocator's
MALLOC = {"2 processes DDP, FSDP's malloc setting": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def workloads(quick: bool) -> dict[str, tuple[str, str, dict, dict]]:
    """name -> (stage, config, overrides, per-launch overrides keyed by process count)."""
    if quick:
        return {"demo nano pretrain": ("pretrain", "configs/pretrain/demo.yaml",
                                       {"model.scratch_size": "nano", "train.max_steps": 2, "train.batch_size": 4,
                                        "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1},
                                       {1: {"train.grad_accum": 2}, 2: {"train.grad_accum": 1}})}
    found = {"demo small pretrain": ("pretrain", "configs/pretrain/demo.yaml",
                                     {"model.scratch_size": "small", "train.max_steps": 6, "train.batch_size": 8,
                                      "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1},
                                     {1: {"train.grad_accum": 2}, 2: {"train.grad_accum": 1}})}
    if SMOLLM2.is_dir():
        found["SmolLM2-135M sft (full)"] = (
            "sft", "configs/smollm2/sft.yaml",
            {"model.path": str(SMOLLM2), "model.lora": None, "save_merged": False, "train.max_steps": 4,
             "train.batch_size": 4, "train.save_every": 0, "train.log_every": 1, "data.max_length": 128},
            {1: {"train.grad_accum": 2}, 2: {"train.grad_accum": 1}})
        found["SmolLM2-135M grpo (full)"] = (
            "grpo", "configs/smollm2/grpo.yaml",
            {"model.path": str(SMOLLM2), "model.lora": None, "train.max_steps": 2, "train.save_every": 0,
             "samples_every": 0, "sampling.n": 4, "sampling.max_new_tokens": 12},
            {1: {"rl.prompts_per_step": 4, "rl.micro_batch_size": 16}, 2: {"rl.prompts_per_step": 2,
                                                                           "rl.micro_batch_size": 8}})
    return found


def command(processes: int, engine: str | None, args: list[str]) -> list[str]:
    cli = ["-m", "rlhf.cli", *args]
    if engine is None:
        return [sys.executable, *cli]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs/accelerate" / f"{engine}.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(port), *cli]


def measure(stage: str, config: str, overrides: dict, out: Path, processes: int, engine: str | None,
            extra_env: dict) -> dict:
    args = [stage, config, *(f"{k}={json.dumps(v)}" for k, v in overrides.items()), f"output_dir={out}",
            "tracking.mode=disabled", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes), "OMP_WAIT_POLICY": "PASSIVE", "RLHF_COMPILE": "0", **extra_env}
    proc = subprocess.run(command(processes, engine, args), cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} on {processes} process(es) {engine or ''} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/peak_rss_gb" in r]
    return {"peak_rss_gb": max(r["perf/peak_rss_gb"] for r in steps),
            "step_s": statistics.median(r["perf/step_seconds"] for r in steps),
            "loss": [r["loss/total"] for r in steps if "loss/total" in r][-1],
            "fsdp": "FSDP2 on CPU" in proc.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the nano model, two steps: a smoke run")
    args = parser.parse_args()
    print("| workload | launch | peak RSS per process (GiB) | vs DDP | median step (s) | last loss |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (stage, config, overrides, split) in workloads(args.quick).items():
            results = {}
            for launch, (processes, engine) in LAUNCHES.items():
                results[launch] = measure(stage, config, {**overrides, **split[processes]},
                                          Path(tmp) / f"{stage}-{len(results)}", processes, engine,
                                          MALLOC.get(launch, {}))
                assert results[launch]["fsdp"] == (engine == "fsdp"), f"{launch} did not run the engine it names"
            ddp = results["2 processes DDP"]["peak_rss_gb"]
            for launch, r in results.items():
                print(f"| {name} | {launch} | {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / ddp:.2f} | "
                      f"{r['step_s']:.2f} | {r['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
