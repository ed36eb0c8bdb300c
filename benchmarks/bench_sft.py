"""SFT training throughput: our `sft` recipe vs TRL's `SFTTrainer`, on the same model, data and batch.

Both sides train the demo world's randomly initialised "tiny" Llama (`build_tiny_lm` for data/demo/tokenizer, plus
the action tokens `<add>`, `<review>`, as `PolicyModel.load` builds it), fp32, on the same subset of
data/demo/sft.jsonl (the first `--examples` rows, prompt/completion), with completion-only loss, batch size 32,
max_length 64, no packing, no gradient accumulation, AdamW (betas 0.9/0.95, no weight decay, lr 1e-3, cosine),
gradient clipping at 1.0, no evaluation and no checkpoints during the run.

- ours: the `sft` recipe's `run(cfg, ctx)` (`common.run_recipe`, as `rlhf.pipeline.run_stage` calls it) with tracking
  disabled and `train.log_every=1`; the timed quantity is the recipe's own `perf/step_seconds` of every step after
  the first `--warmup` steps, read back from the stage's metrics.jsonl (CPU time: the tracker the recipe is handed
  notes `time.process_time()` in each row it logs; nothing in the recipe is patched).
  Each step's lap runs from the end of the previous step to the end of this one, so it covers
  collation, forward, loss, backward, clipping, optimizer and scheduler step and logging. Tokens per step are the
  non-padding tokens of the batch (prompt + completion), `progress/tokens` differences.
- TRL: `SFTTrainer(...).train()` with `max_steps` = warmup + steps, a callback taking `time.monotonic()` at every
  `on_step_end`; the timed quantity is the sum of the laps between consecutive step ends after the first `--warmup`
  steps (so: data loading + collation, forward, loss and TRL's per-step metrics, backward, clipping, optimizer,
  scheduler, logging). Tokens per step are counted the same way (the batch's `attention_mask.sum()`, read by a
  forward pre-hook on the model). TRL's optimizer is its default (`adamw_torch_fused`, see `--trl-optim`); TRL's
  default gradient checkpointing (`SFTConfig.gradient_checkpointing=True` in TRL 1.16) is turned off, because ours
  does not recompute activations and the comparison is of equal work (`--trl-gradient-checkpointing` turns it on:
  TRL's out-of-the-box speed, which recomputes every layer's forward in the backward pass).

Setup (model build, tokenization, trainer construction) and the final save are outside the timed window on both
sides. The two runs alternate (ours, TRL, ours, TRL, ...) in one process; reported: tokens/s and seconds per step,
medians over repeats, and the ratio of medians ours/TRL. The tokenized data of both sides is compared once (mean
sequence and completion lengths) so equal lengths can be checked rather than assumed.

    python benchmarks/bench_sft.py            # 2000 examples, 10 warm-up + 40 timed steps, 5 repeats
    python benchmarks/bench_sft.py --quick    # smoke run: 256 examples, 2 warm-up + 5 timed steps, 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import common

torch = common.setup_torch(1)

from rlhf.config import ModelSettings, OptimSettings, TrackingSettings, TrainSettings  # noqa: E402
from rlhf.data import load_records, tokenize_sft  # noqa: E402
from rlhf.policy import add_special_tokens, load_tokenizer  # noqa: E402
from rlhf.recipes import sft  # noqa: E402
from rlhf.world import ACTION_TOKENS, build_tiny_lm  # noqa: E402

BATCH, MAX_LENGTH, LR, SIZE = 32, 64, 1e-3, "tiny"
TOKENIZER = common.TOKENIZER  # main() points this at a snapshot, so every run of one benchmark sees the same files


def write_subset(path: Path, n: int) -> None:
    lines = [line for line in common.SFT_DATA.read_text().splitlines() if line.strip()][:n]
    path.write_text("\n".join(json.dumps({k: json.loads(line)[k] for k in ("prompt", "completion")}) for line in lines) + "\n")


def quietly(fn):
    """Run `fn()` with its stdout/stderr (progress lines, TRL's log dicts) swallowed; the timings come back."""

    def run():
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return fn()

    return run


def run_ours(data: Path, root: Path, warmup: int, steps: int, repeat: int) -> dict:
    out = root / f"ours-{repeat}"
    cfg = sft.Config(
        seed=0,
        output_dir=str(out),
        model=ModelSettings(scratch_size=SIZE, tokenizer=str(TOKENIZER)),
        action_tokens=list(ACTION_TOKENS),
        data=sft.SFTData(train=str(data), eval=None, eval_fraction=0.0, gold_prompts=None, max_length=MAX_LENGTH),
        train=TrainSettings(max_steps=warmup + steps, batch_size=BATCH, log_every=1, eval_every=0, save_every=0),
        optim=OptimSettings(lr=LR, warmup_steps=0, schedule="cosine", max_grad_norm=1.0),
        tracking=TrackingSettings(mode="disabled"),
    )
    w = common.step_window(common.run_recipe("sft", cfg), warmup, steps)
    seconds, tokens, cpu = w["seconds"], w["tokens"], w["cpu_seconds"]
    return {"tokens_per_s": tokens / seconds, "step_seconds": seconds / steps, "tokens_per_step": tokens / steps,
            "tokens_per_cpu_s": tokens / cpu, "threads": torch.get_num_threads()}


def build_trl(data: Path, root: Path, warmup: int, steps: int, repeat: int, optim: str, checkpointing: bool = False):
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(str(TOKENIZER))
    model = build_tiny_lm(tokenizer, SIZE, seed=0)
    add_special_tokens(model, tokenizer, ACTION_TOKENS)
    dataset = datasets.Dataset.from_list([json.loads(line) for line in data.read_text().splitlines() if line.strip()])

    class Laps(TrainerCallback):
        def __init__(self):
            self.ends: dict[int, float] = {}
            self.cpu: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.ends[state.global_step] = time.monotonic()
            self.cpu[state.global_step] = time.process_time()

    laps, tokens = Laps(), []

    def count(module, args, kwargs):
        if module.training and kwargs.get("attention_mask") is not None:
            tokens.append(int(kwargs["attention_mask"].sum()))

    model.register_forward_pre_hook(count, with_kwargs=True)
    args = SFTConfig(
        output_dir=str(root / f"trl-{repeat}"), seed=0, max_steps=warmup + steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, optim=optim,
        max_length=MAX_LENGTH, packing=False, completion_only_loss=True, bf16=False, fp16=False, use_cpu=True,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10, disable_tqdm=True,
        dataloader_num_workers=0, gradient_checkpointing=checkpointing,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[laps])
    return trainer, laps, tokens


def run_trl(data: Path, root: Path, warmup: int, steps: int, repeat: int, optim: str, checkpointing: bool) -> dict:
    trainer, laps, tokens = build_trl(data, root, warmup, steps, repeat, optim, checkpointing)
    trainer.train()
    seconds = laps.ends[warmup + steps] - laps.ends[warmup]
    n_tokens = sum(tokens[warmup:warmup + steps])
    cpu = laps.cpu[warmup + steps] - laps.cpu[warmup]
    return {"tokens_per_s": n_tokens / seconds, "step_seconds": seconds / steps, "tokens_per_step": n_tokens / steps,
            "tokens_per_cpu_s": n_tokens / cpu, "threads": torch.get_num_threads()}


def compare_tokenization(data: Path, root: Path, optim: str) -> list[list]:
    """Mean sequence / completion lengths of the tokenized data, ours vs TRL (the 'same sequence lengths' check)."""
    tokenizer = load_tokenizer(str(TOKENIZER))
    add_special_tokens(build_tiny_lm(tokenizer, SIZE), tokenizer, ACTION_TOKENS)
    ours, _ = tokenize_sft(load_records(str(data)), tokenizer, MAX_LENGTH)
    trainer, _, _ = build_trl(data, root, 1, 1, -1, optim)
    trl = trainer.train_dataset
    mean = statistics.mean
    return [
        ["ours", len(ours), mean(len(e.input_ids) for e in ours), mean(sum(e.completion_mask) for e in ours)],
        ["TRL", len(trl), mean(len(x) for x in trl["input_ids"]), mean(sum(t != -100 for t in x) for x in trl["labels"])],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 examples, 2 warm-up + 5 timed steps, 1 repeat")
    parser.add_argument("--examples", type=int, default=None, help="rows of data/demo/sft.jsonl used (default 2000)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 40)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per side (default 5)")
    parser.add_argument("--trl-optim", default="adamw_torch_fused", help="TRL's optimizer (default: its own default)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="leave TRL's default gradient checkpointing on (unequal work: TRL recomputes activations)")
    args = parser.parse_args()
    examples = args.examples or (256 if args.quick else 2000)
    warmup = args.warmup or (2 if args.quick else 10)
    steps = args.steps or (5 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 5)

    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(common.environment(1))
    print(f"model={SIZE}, fp32, batch={BATCH}, max_length={MAX_LENGTH}, completion-only loss, {examples} examples, "
          f"{warmup} warm-up + {steps} timed optimizer steps, {repeats} interleaved repeats, TRL optim={args.trl_optim}, "
          f"TRL gradient_checkpointing={args.trl_gradient_checkpointing}")
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        root = Path(tmp)
        data = root / "sft.jsonl"
        write_subset(data, examples)
        global TOKENIZER
        TOKENIZER = Path(shutil.copytree(common.TOKENIZER, root / "tokenizer"))
        print("\ntokenized data (same sequence lengths?):")
        print(common.table(["side", "examples", "mean tokens/seq", "mean completion tokens"],
                           quietly(lambda: compare_tokenization(data, root, args.trl_optim))()))
        print()
        ours_runs, trl_runs = itertools.count(), itertools.count()  # a fresh output directory per run
        results = common.interleaved({
            "ours": quietly(lambda: run_ours(data, root, warmup, steps, next(ours_runs))),
            "TRL": quietly(lambda: run_trl(data, root, warmup, steps, next(trl_runs), args.trl_optim,
                                           args.trl_gradient_checkpointing)),
        }, repeats)

    keys = ("tokens_per_s", "step_seconds", "tokens_per_step", "tokens_per_cpu_s")
    med = {side: {k: common.median(rows, k) for k in keys} for side, rows in results.items()}
    print("\nmedians over repeats; ratio of medians ours/TRL (tokens/s: > 1 = ours faster). tokens/cpu-s divides by "
          "this process's CPU time (time.process_time), which leaves out time other workers held the core:")
    print(common.table(
        ["side", "tokens/s", "s/step", "tokens/step", "tokens/s range", "tokens/cpu-s"],
        [[side, m["tokens_per_s"], m["step_seconds"], m["tokens_per_step"], common.spread(results[side], "tokens_per_s"),
          m["tokens_per_cpu_s"]] for side, m in med.items()],
    ))
    ratio = lambda key: med["ours"][key] / med["TRL"][key]  # noqa: E731
    print(f"ours/TRL s/step: {ratio('step_seconds'):.3f}")
    print(common.ratio_line("ours/TRL tokens/s", ratio("tokens_per_s"), ratio("tokens_per_cpu_s"), "> 1 = ours faster"))


if __name__ == "__main__":
    main()
