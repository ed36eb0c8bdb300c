"""GRPO step throughput and memory: our `grpo` recipe vs TRL's `GRPOTrainer`, on the same model, prompts and step.

Both sides train the demo world's randomly initialised Llama ("small" by default: `build_tiny_lm` for
data/demo/tokenizer plus the action tokens, as `PolicyModel.load` builds it), saved once to a temporary directory so
both load the same weights and tokenizer from files (TRL needs a path for its reference model when β > 0). fp32,
one thread, `OMP_WAIT_POLICY=PASSIVE`. One step = P prompts (`--prompts`, the "add" task of
data/demo/rl_prompts.jsonl) × G completions (`--group`) of at most N new tokens (`--tokens`), temperature 1 with no
top-k / top-p, scored by the same rule (`reward_models.rules.verifiable`), group-normalised advantages, one
optimizer step per rollout (μ = 1, one minibatch, one micro-batch of P × G rows, so no old-log-prob pass on either
side), the clipped surrogate (ε = 0.2) with token-mean aggregation (TRL's default `dapo`) plus β = 0.04 · k3
KL(π‖π_ref) per token, not importance-weighted (`KLSettings.importance_weighted=False`, TRL
`use_bias_correction_kl=False`), AdamW (lr 1e-5, betas 0.9/0.95, no weight decay, constant lr), clipping at 1.0.

- ours: the `grpo` recipe's `run(cfg, ctx)` (`common.run_recipe`, as `rlhf.pipeline.run_stage` calls it) with
  tracking disabled, `train.log_every=1`, no evaluation; timed = its own `perf/step_seconds` of the steps after
  `--warmup`, read back from metrics.jsonl. The phase split comes from the recipe's own metrics too:
  `perf/generate_seconds`, `perf/score_seconds`, `perf/reference_seconds` (`rlhf.rollout.make_experience`'s
  timings) and `perf/update_seconds` (policy forward + loss + backward + clipping + optimizer step).
- TRL: `GRPOTrainer(model=<path>, ...).train()` with `max_steps` = warmup + steps and a callback taking the time at
  every `on_step_end`; timed = the laps between step ends after `--warmup`. Its phases are read by wrapping, on the
  trainer instance only, `_generate` (generation: prompt tokenization, `model.generate`, decoding),
  `_calculate_rewards` (scoring), `_get_per_token_logps_and_entropies` when called with the reference model
  (reference forward) and `training_step` minus `_prepare_inputs` (policy forward + loss + backward). TRL's default
  gradient checkpointing and bf16 are turned off (equal work in fp32); its optimizer is its default
  (`adamw_torch_fused`), its logging every step like ours.
- "optimizer" on both sides = `Accelerator.clip_grad_norm_` + `optimizer.step()`, measured the same way for both (a
  timing wrapper on accelerate's class method and torch's global optimizer-step hooks); it is taken out of our
  `update_seconds` to leave "policy fwd/bwd". "other" = the lap minus the named phases (advantages, padding and
  batching, scheduler, zero_grad, metrics and logging).

Runs alternate (ours, TRL, ours, TRL, ...) in one process, each a fresh trainer (setup untimed); reported: samples/s
(P × G completions per step) medians, wall clock and per CPU-second of this process, the ratio of medians ours/TRL,
and the per-phase seconds per step. Peak RSS is per process, so each side also runs once in a subprocess of its
own (`--child`; the two children run at the same time, untimed) that imports only what that side needs, and
reports its peak RSS (`VmHWM`) and its RSS after imports (the Python runtime: torch, transformers, accelerate, plus
trl or rlhf). The last line is the samples/s ratio (`common.ratio_line`). The sweep then records the same
comparison at G = 4, 8, 16 (N = 32) and N = 32, 64, 128 (G = 8), with fewer repeats.

A real pretrained model (`--model DIR`, a Hugging Face causal-LM directory with a chat template, e.g.
models/smollm2-135m-instruct): both sides load that directory as is; the prompts are the "chat_add" records of
data/chat/rl_prompts.jsonl (chat messages: our recipe renders them through the model's chat template
(`rlhf.data`), TRL takes the conversational prompts natively and applies the same template), scored by the same
`verifiable` rule (TRL's conversational completions handed over as their text). `--lora R` (default 16 with
`--model`, 0 = full fine-tuning) trains LoRA adapters on all linear layers (peft "all-linear", alpha 2R, dropout 0)
on both sides; the reference is then the base model with adapters disabled on both sides (no second copy).
`--micro-batch M` (default P × G; 16 with `--model`) is the rows per forward/backward on both sides: ours
`rl.micro_batch_size=M`, TRL `per_device_train_batch_size=M` with `gradient_accumulation_steps=P × G / M` (its
generation batch, per_device × steps_per_generation, is then the same P × G completions, generated at once, one
optimizer step per rollout; TRL's reference forward also runs M rows at a time). With `--model` the defaults are
P=8, G=8, N=24, 1 warm-up + 2 timed steps, 2 repeats, no sweep, and the RSS children run 1 warm-up + 1 step.

    python benchmarks/bench_grpo.py            # small model, P=2, G=8, N=32, 2 warm-up + 8 timed steps, 5 repeats + sweep
    python benchmarks/bench_grpo.py --quick    # smoke run: nano model, P=2, G=4, N=8, 1 warm-up + 2 timed steps, 1 repeat
    python benchmarks/bench_grpo.py --model models/smollm2-135m-instruct   # real model: P=8, G=8, N=24, LoRA 16, M=16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import common

torch = common.setup_torch(1)

BETA, LR, BETAS, EPS, MAX_GRAD_NORM, SEED = 0.04, 1e-5, (0.9, 0.95), 0.2, 1.0, 0
PHASES = ("generate", "score", "reference", "policy_fwd_bwd", "optimizer", "other")
RL_PROMPTS = common.REPO / "data" / "demo" / "rl_prompts.jsonl"
CHAT_PROMPTS = common.REPO / "data" / "chat" / "rl_prompts.jsonl"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One step's shape, the same on both sides: P prompts × G completions of at most N new tokens, trained M rows
    per forward/backward (M = 0: all P × G rows at once), LoRA rank `lora` (0 = all weights), prompts of `task`."""

    p: int
    g: int
    n: int
    micro: int = 0
    lora: int = 0
    task: str = "add"

    @property
    def rows(self) -> int:
        return self.p * self.g

    @property
    def micro_rows(self) -> int:
        return self.micro or self.rows

# -- instrumentation shared by both sides: clip + optimizer step, one entry per optimizer step --------------------

OPTIMIZER_SECONDS: list[float] = []  # clip_grad_norm_ + optimizer.step() of the current run, per optimizer step
_pending = {"clip": 0.0, "t0": 0.0}


def install_probes() -> None:
    """Time `Accelerator.clip_grad_norm_` and every `optimizer.step()` (torch's global hooks) the same way for both
    sides; the sum of one step's clip and optimizer step is appended to OPTIMIZER_SECONDS."""
    from accelerate import Accelerator
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    clip = Accelerator.clip_grad_norm_

    @functools.wraps(clip)
    def timed_clip(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return clip(self, *args, **kwargs)
        finally:
            _pending["clip"] += time.perf_counter() - start

    Accelerator.clip_grad_norm_ = timed_clip

    def pre(optimizer, args, kwargs):
        _pending["t0"] = time.perf_counter()

    def post(optimizer, args, kwargs):
        OPTIMIZER_SECONDS.append(time.perf_counter() - _pending["t0"] + _pending["clip"])
        _pending["clip"] = 0.0

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


def reset_probes() -> None:
    OPTIMIZER_SECONDS.clear()
    _pending["clip"] = 0.0


# -- shared inputs ---------------------------------------------------------------------------------------------------


def build_model(out: Path, size: str) -> tuple[Path, int]:
    """The demo Llama (random init, seed 0) with the action tokens, saved with its tokenizer: both sides load these."""
    from rlhf.policy import add_special_tokens, load_tokenizer
    from rlhf.world import ACTION_TOKENS, build_tiny_lm

    tokenizer = load_tokenizer(str(common.TOKENIZER))
    model = build_tiny_lm(tokenizer, size, seed=0)
    add_special_tokens(model, tokenizer, ACTION_TOKENS)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(t.numel() for t in model.parameters())  # tied embeddings counted once


def write_prompts(path: Path, n: int, task: str = "add") -> Path:
    """The first `n` prompt records of `task` (prompt, task, meta): "add" from data/demo/rl_prompts.jsonl, "chat_add"
    (chat messages) from data/chat/rl_prompts.jsonl."""
    source = CHAT_PROMPTS if task.startswith("chat_") else RL_PROMPTS
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["task"] == task][:n]
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "task", "meta")}) + "\n" for r in rows))
    return path


def model_parameters(model_dir: Path) -> int:
    """Parameters stored in a model directory's safetensors files (tied embeddings are stored once)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def quietly(fn):
    """Run `fn()` with its stdout/stderr (progress bars, TRL's log dicts) swallowed; the result comes back."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return fn(*args, **kwargs)

    return run


def summary(samples: int, tokens: float, seconds: float, cpu: float, phases: dict[str, float], steps: int) -> dict:
    per_step = {p: phases[p] / steps for p in PHASES[:-1]}
    per_step["other"] = seconds / steps - sum(per_step.values())
    return {"samples_per_s": samples / seconds, "step_seconds": seconds / steps, "samples_per_cpu_s": samples / cpu,
            "completion_tokens_per_step": tokens / steps, **{f"{p}_s": v for p, v in per_step.items()}}


# -- ours: the grpo recipe --------------------------------------------------------------------------------------------


def grpo_config(model_dir: Path, prompts: Path, out: Path, shape: Shape, max_steps: int):
    from rlhf.config import (LoopSettings, LoraSettings, ModelSettings, OptimSettings, RLSettings, SamplingSettings,
                             TrackingSettings)
    from rlhf.recipes import grpo
    from rlhf.recipes.rl_settings import KLSettings, PromptData, RLEvalSettings
    from reward_models.scoring import RewardComponent

    lora = (LoraSettings(r=shape.lora, alpha=2 * shape.lora, dropout=0.0, target_modules="all-linear")
            if shape.lora else None)
    return grpo.Config(
        seed=SEED, output_dir=str(out), model=ModelSettings(path=str(model_dir), lora=lora),
        data=PromptData(prompts=str(prompts), tasks=[shape.task]),
        rewards=[RewardComponent(name="correct", rule="verifiable")],
        sampling=SamplingSettings(n=shape.g, max_new_tokens=shape.n, temperature=1.0, top_p=1.0, top_k=0),
        rl=RLSettings(prompts_per_step=shape.p, epochs=1, minibatches=1, micro_batch_size=shape.micro_rows),
        loss=grpo.GRPOLoss(advantage="grpo", aggregation="token_mean", eps_low=EPS, eps_high=EPS),
        kl=KLSettings(beta=BETA, estimator="k3", importance_weighted=False),
        train=LoopSettings(max_steps=max_steps, log_every=1, eval_every=0, save_every=0),
        optim=OptimSettings(lr=LR, betas=BETAS, weight_decay=0.0, schedule="constant", max_grad_norm=MAX_GRAD_NORM),
        eval=RLEvalSettings(prompts=None), samples_every=0, tracking=TrackingSettings(mode="disabled"),
    )


def run_ours(model_dir: Path, prompts: Path, out: Path, shape: Shape, warmup: int, steps: int) -> dict:
    reset_probes()
    rows = common.run_recipe("grpo", grpo_config(model_dir, prompts, out, shape, warmup + steps))
    window = common.step_window(rows, warmup, steps)
    timed = range(warmup + 1, warmup + steps + 1)
    optimizer = sum(OPTIMIZER_SECONDS[s - 1] for s in timed)
    phases = {
        "generate": sum(rows[s]["perf/generate_seconds"] for s in timed),
        "score": sum(rows[s]["perf/score_seconds"] for s in timed),
        "reference": sum(rows[s]["perf/reference_seconds"] for s in timed),
        "policy_fwd_bwd": sum(rows[s]["perf/update_seconds"] for s in timed) - optimizer,
        "optimizer": optimizer,
    }
    return summary(int(window["samples"]), window["tokens"], window["seconds"], window["cpu_seconds"], phases, steps)


# -- TRL: GRPOTrainer -------------------------------------------------------------------------------------------------


def correct(prompts, completions, task, meta, **kwargs) -> list[float]:
    """`reward_models.rules.verifiable` (the rule our side's Scorer runs) in TRL's reward-function signature.

    Conversational data (chat prompts) comes as message lists: the completion's text is its messages' content, the
    prompt's the user content (chat_add's gold score reads its answer from `meta` either way)."""
    from reward_models.rules import verifiable

    text = lambda x: x if isinstance(x, str) else "".join(str(m.get("content", "")) for m in x)  # noqa: E731
    return verifiable([text(p) for p in prompts], [text(c) for c in completions],
                      [{"task": t, "meta": m} for t, m in zip(task, meta)])


def build_trl(model_dir: Path, prompts: Path, out: Path, shape: Shape, max_steps: int):
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_list([json.loads(line) for line in prompts.read_text().splitlines()])
    if shape.rows % shape.micro_rows:
        raise SystemExit(f"--micro-batch {shape.micro_rows} must divide P × G = {shape.rows} (TRL accumulates whole "
                         "micro-batches)")
    args = GRPOConfig(
        output_dir=str(out), seed=SEED, max_steps=max_steps, per_device_train_batch_size=shape.micro_rows,
        gradient_accumulation_steps=shape.rows // shape.micro_rows, num_generations=shape.g,
        max_completion_length=shape.n, temperature=1.0, top_p=1.0,
        top_k=0, beta=BETA, num_iterations=1, epsilon=EPS, loss_type="dapo", scale_rewards="group",
        use_bias_correction_kl=False, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no",
        eval_strategy="no", disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
    )

    class Laps(TrainerCallback):
        def __init__(self):
            self.ends: dict[int, float] = {}
            self.cpu: dict[int, float] = {}
            self.phases: dict[int, dict[str, float]] = {}
            self.current: dict[str, float] = {}

        def add(self, phase: str, seconds: float) -> None:
            self.current[phase] = self.current.get(phase, 0.0) + seconds

        def on_step_end(self, args, state, control, **kwargs):
            self.ends[state.global_step] = time.perf_counter()
            self.cpu[state.global_step] = time.process_time()
            self.phases[state.global_step], self.current = self.current, {}

    laps = Laps()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    peft_config = None
    if shape.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=shape.lora, lora_alpha=2 * shape.lora, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[correct], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[laps], peft_config=peft_config)
    if args.generation_batch_size != shape.rows:
        raise RuntimeError(f"TRL generates {args.generation_batch_size} completions per step, not P × G = {shape.rows}")

    def timed(phase: str, fn, count_tokens: bool = False):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            result = fn(*a, **k)
            laps.add(phase, time.perf_counter() - start)
            if count_tokens:  # _generate returns (prompt_ids, completion_ids, ...) as lists of token lists
                laps.add("completion_tokens", sum(len(ids) for ids in result[1]))
            return result
        return wrapper

    logps = trainer._get_per_token_logps_and_entropies

    @functools.wraps(logps)
    def timed_logps(model, *a, **k):
        start = time.perf_counter()
        result = logps(model, *a, **k)
        # the reference: its own model, or under LoRA the policy with adapters disabled, the only call made without
        # grad here (the old-log-prob pass is skipped: μ = 1 and steps_per_generation = gradient_accumulation_steps)
        if model is trainer.ref_model or (trainer.ref_model is None and not torch.is_grad_enabled()):
            laps.add("reference", time.perf_counter() - start)
        return result

    trainer._generate = timed("generate", trainer._generate, count_tokens=True)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer._prepare_inputs = timed("prepare_inputs", trainer._prepare_inputs)
    trainer.training_step = timed("training_step", trainer.training_step)
    return trainer, laps


def run_trl(model_dir: Path, prompts: Path, out: Path, shape: Shape, warmup: int, steps: int) -> dict:
    trainer, laps = build_trl(model_dir, prompts, out, shape, warmup + steps)
    reset_probes()
    trainer.train()
    timed = range(warmup + 1, warmup + steps + 1)
    total = lambda key: sum(laps.phases[s].get(key, 0.0) for s in timed)  # noqa: E731
    optimizer = sum(OPTIMIZER_SECONDS[s - 1] for s in timed)
    phases = {
        "generate": total("generate"), "score": total("score"), "reference": total("reference"),
        "policy_fwd_bwd": total("training_step") - total("prepare_inputs"), "optimizer": optimizer,
    }
    seconds = laps.ends[warmup + steps] - laps.ends[warmup]
    cpu = laps.cpu[warmup + steps] - laps.cpu[warmup]
    return summary(shape.rows * steps, total("completion_tokens"), seconds, cpu, phases, steps)


# -- peak RSS: one side per process --------------------------------------------------------------------------------


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status in MiB: VmRSS (now) or VmHWM (peak of this process image).

    VmHWM rather than `ru_maxrss`: a child inherits the parent's ru_maxrss across fork + exec, so a subprocess
    started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> None:
    """One side's run in a process of its own: print its RSS after imports and its peak RSS (MiB) as JSON."""
    from accelerate import Accelerator  # noqa: F401  (both sides use these; ours imports them lazily)
    from transformers import GenerationConfig, LlamaForCausalLM  # noqa: F401

    if args.child == "ours":
        from rlhf import pipeline  # noqa: F401  (what run_recipe imports)
        from rlhf.recipes import grpo  # noqa: F401
    else:
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    install_probes()
    runtime = status_mib("VmRSS")
    fn = run_ours if args.child == "ours" else run_trl
    quietly(fn)(Path(args.model_dir), Path(args.prompt_file), Path(args.out), shape_of(args), args.warmup, args.steps)
    peak = status_mib("VmHWM")
    print("RSS " + json.dumps({"side": args.child, "runtime_mib": runtime, "peak_mib": peak}))


def measure_rss(model_dir: Path, prompts: Path, root: Path, args, warmup: int, steps: int) -> dict[str, dict]:
    """Both sides' RSS children, started together (memory is per process; nothing in them is timed)."""
    procs = {}
    for side in ("ours", "trl"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--model-dir", str(model_dir),
               "--prompt-file", str(prompts), "--out", str(root / f"rss-{side}"), "--prompts", str(args.prompts),
               "--group", str(args.group), "--tokens", str(args.tokens), "--warmup", str(warmup),
               "--steps", str(steps), "--micro-batch", str(args.micro_batch), "--lora", str(args.lora),
               "--task", args.task]
        procs[side] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.REPO)
    out = {}
    for side, proc in procs.items():
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("RSS ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"RSS child for {side} failed (rc={proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
        out[side] = json.loads(lines[-1][4:])
    return out


# -- the comparison ----------------------------------------------------------------------------------------------------


def compare(model_dir: Path, prompts: Path, root: Path, shape: Shape, warmup: int, steps: int,
            repeats: int) -> dict[str, list[dict]]:
    runs = itertools.count()
    out = lambda side: root / f"{side}-g{shape.g}-n{shape.n}-{next(runs)}"  # noqa: E731  (a fresh directory per run)
    return common.interleaved({
        "ours": lambda: quietly(run_ours)(model_dir, prompts, out("ours"), shape, warmup, steps),
        "TRL": lambda: quietly(run_trl)(model_dir, prompts, out("trl"), shape, warmup, steps),
    }, repeats)


def shape_of(args, g: int | None = None, n: int | None = None) -> Shape:
    return Shape(args.prompts, g or args.group, n or args.tokens, args.micro_batch, args.lora, args.task)


def medians(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    return {side: {k: common.median(rows, k) for k in rows[0]} for side, rows in results.items()}


def report(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    med = medians(results)
    print("\nmedians over repeats (samples/s: P × G completions per second; per cpu-s: per CPU-second of this process):")
    print(common.table(
        ["side", "samples/s", "range", "s/step", "samples/cpu-s", "completion tokens/step"],
        [[side, m["samples_per_s"], common.spread(results[side], "samples_per_s"), m["step_seconds"],
          m["samples_per_cpu_s"], m["completion_tokens_per_step"]] for side, m in med.items()],
    ))
    print("\nseconds per step by phase (medians; share of the step's median in brackets):")
    rows = []
    for phase in PHASES:
        row = [phase]
        for side in med:
            value = med[side][f"{phase}_s"]
            row.append(f"{value:.4f} ({100 * value / med[side]['step_seconds']:.0f}%)")
        row.append(f"{med['ours'][f'{phase}_s'] / med['TRL'][f'{phase}_s']:.2f}" if med["TRL"][f"{phase}_s"] > 0 else "–")
        rows.append(row)
    print(common.table(["phase", "ours", "TRL", "ours/TRL time"], rows))
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: nano model, P=2, G=4, N=8, 1+2 steps, 1 repeat")
    parser.add_argument("--size", default=None, help="demo model size: nano | tiny | small (default small)")
    parser.add_argument("--model", help="a pretrained causal-LM directory with a chat template (chat_add prompts) "
                        "instead of a demo model, e.g. models/smollm2-135m-instruct")
    parser.add_argument("--lora", type=int, default=None, help="LoRA rank on all linear layers, alpha 2R (default: 16 "
                        "with --model, else 0 = all weights)")
    parser.add_argument("--micro-batch", type=int, default=None, help="M: rows per forward/backward on both sides "
                        "(default: 16 with --model, else P × G)")
    parser.add_argument("--prompts", type=int, default=None, help="P: prompts per step (default 2; 8 with --model)")
    parser.add_argument("--group", type=int, default=None, help="G: completions per prompt (default 8)")
    parser.add_argument("--tokens", type=int, default=None, help="N: max new tokens (default 32; 24 with --model)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first in every run (default 2; 1 with --model)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 8; 2 with --model)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per side (default 5; 2 with --model)")
    parser.add_argument("--sweep-repeats", type=int, default=None,
                        help="repeats of each sweep point (default 3; 0 with --model; 0 = no sweep)")
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    real = bool(args.model)
    args.size = args.size or ("nano" if args.quick else "small")
    args.prompts = args.prompts or (8 if real and not args.quick else 2)
    args.group = args.group or (4 if args.quick else 8)
    args.tokens = args.tokens or (8 if args.quick else 24 if real else 32)
    args.warmup = args.warmup or (1 if args.quick or real else 2)
    args.steps = args.steps or (2 if args.quick or real else 8)
    args.repeats = args.repeats or (1 if args.quick else 2 if real else 5)
    args.lora = (16 if real else 0) if args.lora is None else args.lora
    args.micro_batch = args.micro_batch if args.micro_batch is not None else (min(16, args.prompts * args.group)
                                                                             if real else 0)
    args.task = args.task or ("chat_add" if real else "add")  # the RSS children get theirs passed
    sweep_repeats = 0 if args.quick else args.sweep_repeats if args.sweep_repeats is not None else 0 if real else 3

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.child:
        return child(args)

    install_probes()
    print(common.environment(1))
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}")
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        root = Path(tmp)
        if real:
            model_dir, n_params = Path(args.model).resolve(), model_parameters(Path(args.model))
            name = model_dir.name
        else:
            model_dir, n_params = quietly(build_model)(root / "model", args.size)
            name = args.size
        prompts = write_prompts(root / "prompts.jsonl", 256, args.task)
        shape = shape_of(args)
        print(f"model={name} ({n_params / 1e6:.2f}M parameters, tied embeddings counted once), fp32, "
              f"{f'LoRA r={args.lora} alpha={2 * args.lora} all-linear' if args.lora else 'all weights trained'}, "
              f"task {args.task}, P={args.prompts} prompts × G={args.group} completions, N={args.tokens} new tokens, "
              f"micro-batch {shape.micro_rows} rows (TRL: per_device_train_batch_size={shape.micro_rows} × "
              f"gradient_accumulation_steps={shape.rows // shape.micro_rows}), β={BETA}, "
              f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.repeats} interleaved repeats\n")
        results = compare(model_dir, prompts, root, shape, args.warmup, args.steps, args.repeats)
        med = report(results)

        rss = None
        if not args.no_rss:
            rss_steps = (1, 1) if real else (args.warmup, args.steps)
            print(f"\npeak-RSS children: {rss_steps[0]} warm-up + {rss_steps[1]} step(s) each, both at once", flush=True)
            rss = measure_rss(model_dir, prompts, root, args, *rss_steps)
            print("\npeak RSS, one side per process (MiB; runtime = RSS after imports, before the model loads):")
            print(common.table(["side", "peak RSS", "runtime", "peak − runtime"],
                               [[s, r["peak_mib"], r["runtime_mib"], r["peak_mib"] - r["runtime_mib"]]
                                for s, r in rss.items()]))

        sweep = []
        if sweep_repeats:
            points = [(4, 32), (16, 32), (8, 64), (8, 128)]
            base = (args.group, args.tokens)
            sweep.append((base, med))
            for g, n in points:
                if (g, n) == base:
                    continue
                print(f"\nsweep: G={g}, N={n}")
                part = compare(model_dir, prompts, root, shape_of(args, g, n), args.warmup, max(3, args.steps // 2),
                               sweep_repeats)
                sweep.append(((g, n), medians(part)))
            print(f"\nsweep (P={args.prompts}; medians; the G={base[0]}, N={base[1]} row is the main comparison above):")
            print(common.table(
                ["G", "N", "ours s/step", "TRL s/step", "ratio samples/s", "ours samples/cpu-s", "TRL samples/cpu-s",
                 "ratio per CPU-s", "ours gen share", "TRL gen share"],
                [[g, n, m["ours"]["step_seconds"], m["TRL"]["step_seconds"],
                  f"{m['ours']['samples_per_s'] / m['TRL']['samples_per_s']:.3f}", m["ours"]["samples_per_cpu_s"],
                  m["TRL"]["samples_per_cpu_s"], f"{m['ours']['samples_per_cpu_s'] / m['TRL']['samples_per_cpu_s']:.3f}",
                  f"{100 * m['ours']['generate_s'] / m['ours']['step_seconds']:.0f}%",
                  f"{100 * m['TRL']['generate_s'] / m['TRL']['step_seconds']:.0f}%"]
                 for (g, n), m in sorted(sweep, key=lambda item: (item[0][1], item[0][0]))],
            ))

    with open("/proc/loadavg") as f:
        print(f"\nload average at end: {' '.join(f.read().split()[:3])}")
    ratio = lambda key: med["ours"][key] / med["TRL"][key]  # noqa: E731
    if rss is not None:
        print(f"peak RSS ours/TRL: {rss['ours']['peak_mib'] / rss['trl']['peak_mib']:.3f} (< 1 = ours smaller)")
    print(common.ratio_line("ours/TRL samples/s", ratio("samples_per_s"), ratio("samples_per_cpu_s"), "> 1 = ours faster"))


if __name__ == "__main__":
    main()
