"""Reward-model training throughput: our `reward` stage vs TRL's `RewardTrainer`, side by side in one run.

Both sides train the demo world's randomly initialised Llama (`build_tiny_lm` for data/demo/tokenizer, "tiny" by
default), fp32, one thread, on the same preference file written by the project (`reward_models.pairs`
example pairs, TRL format, read by TRL as is), batch `--batch` pairs (2 × batch sequences per forward pass on both
sides: chosen and rejected are concatenated), no gradient accumulation, AdamW (lr 1e-4, betas 0.9/0.999, no weight
decay, linear decay), clipping at 1.0, no centering, no evaluation or checkpoints inside the timed window.

- ours: the `reward` recipe's `run(cfg, ctx)` (`common.run_recipe`, as `rlhf.pipeline.run_stage` calls it) with
  tracking disabled and `train.log_every=1`; the timed quantity is the recipe's own `perf/step_seconds` of every step
  after the first `--warmup`, read back from metrics.jsonl (CPU time: the tracker the recipe is handed notes
  `time.process_time()` in each row; nothing in the recipe is patched). A lap runs from the end of one step to the
  end of the next: collation, forward, loss, backward, clipping, optimizer, scheduler, logging.
- TRL: `RewardTrainer(...).train()` for the same number of steps, a callback taking `time.perf_counter()` (and
  `time.process_time()`) at every `on_step_end`; timed: the laps between step ends after the first `--warmup` (data
  loading + collation, forward, loss and TRL's per-step metrics, backward, clipping, optimizer, scheduler, logging).
  TRL's default gradient checkpointing (`RewardConfig.gradient_checkpointing=True`) and bf16 are turned off so both
  do equal work in fp32; its optimizer is its default (`adamw_torch_fused`).

Setup (model build, tokenization, trainer construction) and the final save/evaluation are outside the timed window.
Runs alternate (ours, TRL, ours, TRL, ...); reported: pairs/s medians (wall clock and per CPU-second of this
process) and the ratio of medians ours/TRL.

    python benchmarks/bench_reward.py            # tiny model, batch 16, 5 warm-up + 30 timed steps, 3 repeats
    python benchmarks/bench_reward.py --quick    # smoke run: tiny model, batch 16, 2 warm-up + 5 timed steps, 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import common

torch = common.setup_torch(1)

from reward_models import train  # noqa: E402
from reward_models.pairs import example_pairs, write_jsonl  # noqa: E402

LR, BETAS, MAX_LENGTH = 1e-4, (0.9, 0.999), 128


def build_model(out: Path, size: str) -> Path:
    """A demo-world Llama (random init) saved with the demo tokenizer: both trainers start from these files."""
    from transformers import AutoTokenizer

    from rlhf.world import build_tiny_lm

    tok = AutoTokenizer.from_pretrained(common.TOKENIZER)
    build_tiny_lm(tok, size, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_ours(model_dir: Path, data: Path, out: Path, steps: int, batch: int, warmup: int, stats: int) -> dict:
    cfg = train.Config.model_validate({
        "model": {"path": str(model_dir), "max_length": MAX_LENGTH},
        "data": {"train": str(data), "eval_fraction": 0.02},
        "output_dir": str(out),
        "train": {"max_steps": warmup + steps, "batch_size": batch, "log_every": 1},
        "optim": {"lr": LR, "betas": BETAS, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "linear",
                  "max_grad_norm": 1.0},
        "stats": {"num_samples": stats},
        "tracking": {"mode": "disabled"},
    })
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        w = common.step_window(common.run_recipe("reward", cfg), warmup, steps)
    return {"pairs_per_s": w["samples"] / w["seconds"], "step_s": w["seconds"] / steps,
            "pairs_per_cpu_s": w["samples"] / w["cpu_seconds"]}


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, batch: int, warmup: int) -> dict:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    stamps: list[float] = []
    cpu: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        args = RewardConfig(
            output_dir=str(out), max_steps=warmup + steps, per_device_train_batch_size=batch, learning_rate=LR,
            adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0, lr_scheduler_type="linear", max_grad_norm=1.0,
            logging_steps=1, report_to="none", save_strategy="no", bf16=False, gradient_checkpointing=False,
            use_cpu=True, max_length=MAX_LENGTH, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        )
        dataset = load_dataset("json", data_files=str(data), split="train")
        trainer = RewardTrainer(model=str(model_dir), args=args, train_dataset=dataset, callbacks=[StepClock()])
        trainer.train()
    seconds = stamps[warmup + steps - 1] - stamps[warmup - 1]
    return {"pairs_per_s": batch * steps / seconds, "step_s": seconds / steps,
            "pairs_per_cpu_s": batch * steps / (cpu[warmup + steps - 1] - cpu[warmup - 1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 warm-up + 5 timed steps, 1 repeat")
    parser.add_argument("--size", default="tiny", help="demo model size (nano | tiny | small)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 30; --quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps of each run, >= 1 (default 5; --quick 2)")
    parser.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved (ours, TRL) repeats (default 3; --quick 1)")
    args = parser.parse_args()
    args.steps = args.steps if args.steps is not None else (5 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    pairs = 8 * args.batch if args.quick else max(400, args.batch * (args.warmup + args.steps))
    stats = 8
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step includes one-time setup)")

    print(common.environment(1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model", args.size)
        data = write_jsonl_path(tmp / "pairs.jsonl", pairs)
        count = iter(range(10**6))
        results = common.interleaved({
            "ours": lambda: run_ours(model_dir, data, tmp / f"ours{next(count)}", args.steps, args.batch, args.warmup,
                                     stats),
            "TRL": lambda: run_trl(model_dir, data, tmp / f"trl{next(count)}", args.steps, args.batch, args.warmup),
        }, args.repeats)
    med = {side: {k: common.median(rows, k) for k in ("pairs_per_s", "step_s", "pairs_per_cpu_s")}
           for side, rows in results.items()}
    print(f"\nmodel {args.size}, batch {args.batch} pairs, fp32, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.repeats} repeats, {pairs} pairs in the file")
    print(common.table(["", "pairs/s (median)", "range", "s/step (median)", "pairs/cpu-s (median)"], [
        [label, med[side]["pairs_per_s"], common.spread(results[side], "pairs_per_s"), med[side]["step_s"],
         med[side]["pairs_per_cpu_s"]] for side, label in (("ours", "ours (reward stage)"), ("TRL", "TRL RewardTrainer"))
    ]))
    ratio = lambda key: med["ours"][key] / med["TRL"][key]  # noqa: E731
    print(common.ratio_line("ours/TRL pairs/s", ratio("pairs_per_s"), ratio("pairs_per_cpu_s"), "target >= 1.0"))


def write_jsonl_path(path: Path, n: int) -> Path:
    """The project's own preference file (demo-world review pairs, simulated annotators), TRL's format."""
    write_jsonl(example_pairs(n), path)
    return path


if __name__ == "__main__":
    main()
