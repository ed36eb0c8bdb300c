"""Building blocks the training recipes share: optimizer + schedule, a stateless data order, resumable
checkpoints. The loops themselves live in the recipes, read top to bottom."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import weakref
import zipfile
from pathlib import Path

import torch

from rlhf.config import OptimSettings
from rlhf.distributed import is_fsdp, reduce_metrics, sharded_parameters
from rlhf.errors import UserError
from rlhf.stage import TMP_PREFIX, atomic_write, write_into

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ZERO_GRAD_WARN_STEPS = 20  # warn when the gradient norm is exactly 0 for this many optimizer steps in a row


class NonFiniteError(UserError):
    """The loss or the gradient norm is NaN / infinite: training diverged. Raised before the optimizer step, so the
    weights (and every checkpoint written so far) stay finite; the runner marks the stage `failed`."""


def make_optimizer(params, optim: OptimSettings) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay, as in GPT-2/nanoGPT."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update (on CPU 3x faster than foreach for the demo models, which TRL's default
    # already uses); foreach (one multi-tensor kernel per op) where a device has no fused kernel
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), foreach=True)


def lr_factor(step: int, optim: OptimSettings, max_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warmup, then cosine / linear decay to 10%."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
    return 0.1 + 0.9 * decay


def make_scheduler(optimizer, optim: OptimSettings, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, max_steps))


def micro_batch_indices(n: int, batch_size: int, index: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Example indices of global micro-batch `index` for process `rank`.

    The order is a fresh seeded permutation each epoch, computed from (seed, epoch) alone, so resuming at any
    step needs only the step number: no sampler state to save.
    """
    start = (index * world + rank) * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, n)
        perm = _epoch_permutation(n, seed, epoch)
        out.append(int(perm[offset]))
    return out


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return _PERM_CACHE[key]


# ---------------------------------------------------------------------------------------------------------------
# Resumable checkpoints: model, optimizer, scheduler and RNG through accelerate; step and counters in state.json


def save_checkpoint(accelerator, stage_dir: Path, step: int, counters: dict, keep: int = 1) -> Path:
    """Write `checkpoints/step-XXXXXX` atomically (written under a temporary name, then renamed); a write that fails
    (a full disk, Ctrl-C) removes its temporary directory."""
    root = Path(stage_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f"{TMP_PREFIX}-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        # safetensors refuses tied weights (embeddings shared with the LM head), so use torch's format here
        accelerator.save_state(str(tmp), safe_serialization=False)
        accelerator.wait_for_everyone()  # every process has written its part (its RNG state at least) before the rename
        if accelerator.is_main_process:
            atomic_write(tmp / "state.json", json.dumps({"step": step, **counters}))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # left by an attempt killed after the rename but before it pruned
            _delete(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            _delete(old)
    accelerator.wait_for_everyone()
    return final


def _delete(path: Path) -> None:
    """Rename, then delete: a kill midway leaves a temporary directory (removed later), never half a checkpoint."""
    trash = path.with_name(f"{TMP_PREFIX}-deleted-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    found = sorted((Path(stage_dir) / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def checkpoint_problem(path: Path) -> str | None:
    """Why a resume cannot load checkpoint `path` (what a kill or a full disk leaves), or None."""
    try:
        json.loads((path / "state.json").read_text())["step"]
    except FileNotFoundError:
        return "its state.json is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return "its state.json is unreadable"
    for file in sorted(path.iterdir()):  # torch files are zip archives: a cut one has no central directory
        if file.suffix in (".bin", ".pkl", ".pt") and file.is_file() and not zipfile.is_zipfile(file):
            return f"its {file.name} is truncated"
    return None


def usable_checkpoint(stage_dir: Path, quiet: bool = False) -> Path | None:
    """The newest checkpoint a resume can load, skipping (with a note unless `quiet`) any a kill or a full disk cut.
    UserError when there are checkpoints but none is usable."""
    found = sorted((Path(stage_dir) / CHECKPOINTS).glob("step-*"), reverse=True)
    for ckpt in found:
        if (problem := checkpoint_problem(ckpt)) is None:
            return ckpt
        if not quiet:
            print(f"checkpoint {ckpt} cannot be resumed from ({problem}): trying the one before")
    if found:
        raise UserError(f"cannot resume: no usable checkpoint in {found[0].parent} (the newest, {found[0].name}: "
                        f"{checkpoint_problem(found[0])}); remove {found[0].parent} to start this stage again from "
                        "step 0, or pass --overwrite to start over")
    return None


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the counters (step, samples, tokens...)."""
    from accelerate.utils.constants import FSDP_MODEL_NAME

    sharded = (Path(path) / f"{FSDP_MODEL_NAME}_0").is_dir()  # FSDP's sharded state (torch.distributed.checkpoint)
    if sharded != is_fsdp(accelerator):
        how = ("launch it with an FSDP accelerate config (configs/accelerate/fsdp.yaml, any --num_processes)" if sharded
               else "launch it without FSDP (plain, or configs/accelerate/ddp.yaml)")
        raise UserError(f"cannot resume from {path}: it was saved {'sharded by FSDP' if sharded else 'whole, without FSDP'}; "
                        f"{how}, or remove {Path(path).parent} to start this stage again from step 0")
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # damage the file checks cannot see
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"cannot resume from {path} ({reason}); remove {path} to resume from the checkpoint before "
                        "it (or from step 0)") from exc
    return json.loads((path / "state.json").read_text())


def resume_state(accelerator, ctx) -> tuple[int, dict, "StepTimer"]:
    """(first step, counters, timer): restored from the last usable checkpoint when the stage is resuming, else zero.

    Model, optimizer, scheduler and RNG are restored in place by accelerate; the data order needs only the step.
    """
    counters = {"samples": 0, "tokens": 0, "seconds": 0.0}
    start = 0
    if ctx.resume and (ckpt := usable_checkpoint(ctx.dir, quiet=True)) is not None:  # the runner told already
        counters = load_checkpoint(accelerator, ckpt)
        start = counters.pop("step")
        print(f"resuming {ctx.name} from {ckpt.name}")
    return start, counters, StepTimer(counters["seconds"])


def is_due(every: int, done: int, max_steps: int) -> bool:
    """Periodic eval / checkpoint at step `done`? Never at the last step: the final eval and save cover it."""
    return bool(every) and done % every == 0 and done != max_steps


def remove_checkpoints(stage_dir: Path) -> None:
    """Resumable state is only useful while a stage is unfinished; a complete stage keeps its final model."""
    if (Path(stage_dir) / CHECKPOINTS).exists():
        _delete(Path(stage_dir) / CHECKPOINTS)


class StepTimer:
    """Wall time per optimizer step and since start (excluding time before a resume)."""

    def __init__(self, elapsed: float = 0.0):
        self.start = time.monotonic() - elapsed
        self.last = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        lap, self.last = now - self.last, now
        return lap

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


# ---------------------------------------------------------------------------------------------------------------
# The loop's small pieces


_zero_norm_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> consecutive zero norms


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float | None, *,
                   loss: float | None = None) -> float:
    """Check, clip, step, schedule, zero. Returns the pre-clip global gradient norm.

    A non-finite gradient norm (or `loss`, when given) raises `NonFiniteError` before the step: nothing NaN is ever
    stepped into the weights or saved. A norm of exactly 0 for `ZERO_GRAD_WARN_STEPS` steps in a row logs one
    warning (a collapsed model learns nothing); it never fails, since an RL loss can be legitimately 0.
    """
    if max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        if norm is None:  # DeepSpeed clipped (its config's gradient_clipping) and stepped inside backward already
            norm = getattr(model, "get_global_grad_norm", lambda: None)()
            return float(norm) if norm is not None else float("nan")
        norm = float(norm)
    else:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    _check_finite(accelerator, optimizer, norm, loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    streak = _zero_norm_steps.get(optimizer, 0) + 1 if norm == 0.0 else 0
    _zero_norm_steps[optimizer] = streak
    if streak == ZERO_GRAD_WARN_STEPS:
        log.warning("the gradient norm has been exactly 0 for %d optimizer steps in a row: the model is not learning "
                    "(collapsed, e.g. by too high an optim.lr, or the loss carries no signal)", streak)
    return norm


def _check_finite(accelerator, optimizer, norm: float, loss: float | None) -> None:
    bad = {name: value for name, value in (("loss", loss), ("gradient norm", norm))
           if value is not None and not math.isfinite(value)}
    if accelerator.num_processes > 1:  # every process must stop, not only the one whose local loss is NaN
        flag = accelerator.reduce(torch.tensor([float(bool(bad))], device=accelerator.device), "sum")
        if flag.item() and not bad:
            bad = {"loss on another process": float("nan")}
    if bad:
        optimizer.zero_grad(set_to_none=True)
        what = ", ".join(f"{name} {value}" for name, value in bad.items())
        raise NonFiniteError(f"non-finite {what} at optimizer step {_steps_taken(optimizer) + 1}: training diverged "
                             "and was stopped before the step (try a lower optim.lr or optim.max_grad_norm)")


def _steps_taken(optimizer) -> int:
    """Optimizer steps taken so far (AdamW's per-parameter step count, restored on resume)."""
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


class MetricSums:
    """A step's update metrics, summed over micro-batches and optimizer updates (minibatches).

    A micro-batch's loss is its share of the minibatch loss (one global normalizer), so `loss/` terms add up over a
    minibatch's micro-batches; any other term (a rate: clip fraction, entropy...) is averaged over them, weighted. `add` the
    stats of each micro-batch, `end_minibatch` after each optimizer update; `means()` then gives each term's mean
    over the step's updates and `first` the first update's terms (ratio 1 and approx-KL 0 there: a sanity check).
    """

    def __init__(self):
        self.current: dict[str, float] = {}  # the open minibatch
        self.totals: dict[str, float] = {}
        self.first: dict[str, float] | None = None
        self.updates = 0

    def add(self, stats: dict, share: float) -> None:
        """One micro-batch's stats; `share`: its weight in the minibatch's averages (1 / micro-batches, or its share
        of the pairs)."""
        for key, value in stats.items():
            self.current[key] = self.current.get(key, 0.0) + float(value) * (1.0 if key.startswith("loss/") else share)

    def end_minibatch(self, extra: dict | None = None) -> dict[str, float]:
        """Close the open minibatch (plus per-update values in `extra`, e.g. the gradient norm); return its terms."""
        minibatch, self.current = {**self.current, **(extra or {})}, {}
        for key, value in minibatch.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        if self.first is None:
            self.first = minibatch
        self.updates += 1
        return minibatch

    def means(self) -> dict[str, float]:
        return {key: value / max(self.updates, 1) for key, value in self.totals.items()}

    def first_minibatch(self, *keys: str) -> dict[str, float]:
        """`train/first_minibatch_<name>` for each `train/<name>` in `keys` the first update logged."""
        return {f"train/first_minibatch_{k.split('/')[-1]}": (self.first or {})[k] for k in keys if k in (self.first or {})}


def progress_axes(counters: dict, timer: StepTimer) -> dict[str, float]:
    """The shared x-axes (progress/samples, progress/tokens, progress/seconds) every logged row carries."""
    return {"progress/samples": counters["samples"], "progress/tokens": counters["tokens"], "progress/seconds": timer.elapsed}


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def end_of_step(ctx, accelerator, train, done: int, counters: dict, timer: StepTimer, *, tokens: int,
                metrics: dict, evaluate=None, state: dict | None = None) -> float:
    """The per-step tail every recipe shares, after its optimizer step(s) and counter updates. Returns the lap.

    Logs `metrics` (reduced over processes) plus perf/step_seconds, perf/tokens_per_s (`tokens` processed this step
    by all processes), perf/peak_rss_gb and the progress axes every `train.log_every` steps and at the last;
    evaluates (`evaluate() -> dict`) every `train.eval_every`; checkpoints every `train.save_every` with `counters`
    and extra resumable floats in `state` (e.g. the adaptive KL coefficient). The final eval and save stay in the
    recipe.
    """
    lap = timer.lap()
    if done % train.log_every == 0 or done == train.max_steps:
        ctx.tracker.log({
            **reduce_metrics(accelerator, {**metrics, "perf/step_seconds": lap, "perf/peak_rss_gb": peak_rss_gb()}),
            "perf/tokens_per_s": tokens / max(lap, 1e-9), **progress_axes(counters, timer),
        }, step=done)
    if evaluate is not None and is_due(train.eval_every, done, train.max_steps):
        ctx.tracker.log({**evaluate(), **progress_axes(counters, timer)}, step=done)
    if is_due(train.save_every, done, train.max_steps):
        save_checkpoint(accelerator, ctx.dir, done, {**counters, **(state or {}), "seconds": timer.elapsed},
                        train.keep_checkpoints)
    return lap


class EarlyStop:
    """`rl.early_stop`: follows a step metric smoothed by an EMA, writes the policy's weights whenever the smoothed
    value is the best so far (`<stage>/best/step-<n>.pt`, so a resumed stage still has them), says when `patience`
    steps went by without a better one, and puts the best weights back before the final evaluation and save. Its
    state travels in the checkpoints. PPO restores the policy; its critic stays the last step's."""

    DIR = "best"

    def __init__(self, settings, directory: Path, accelerator, state: dict | None = None):
        if accelerator.num_processes > 1:
            raise UserError("rl.early_stop runs in one process (its best weights are one file); launch without "
                            "accelerate, or drop rl.early_stop")
        self.settings = settings
        self.dir = Path(directory) / self.DIR
        state = state or {}
        self.smoothed: float | None = state.get("smoothed")
        self.best: float | None = state.get("best")
        self.best_step = int(state.get("best_step", 0))
        self.waited = int(state.get("waited", 0))
        self.stopped_at: int | None = None

    def state_dict(self) -> dict:
        return {"smoothed": self.smoothed, "best": self.best, "best_step": self.best_step, "waited": self.waited}

    def update(self, metrics: dict, step: int, model) -> bool:
        """Take step `step`'s metrics (after its update: `model` holds that step's weights); True = stop now."""
        s = self.settings
        if s.metric not in metrics:
            from rlhf.config import nearest_key

            hint = nearest_key(s.metric, list(metrics))
            raise UserError(f"rl.early_stop.metric '{s.metric}' is not a metric of this stage's steps"
                            + (f" (did you mean '{hint}'?)" if hint else ""))
        x = float(metrics[s.metric])
        self.smoothed = x if self.smoothed is None else s.smoothing * self.smoothed + (1 - s.smoothing) * x
        if step <= s.warmup_steps:
            return False
        sign = 1.0 if s.mode == "max" else -1.0
        if self.best is None or sign * (self.smoothed - self.best) > s.min_delta:
            self.best, self.best_step, self.waited = self.smoothed, step, 0
            # one file per best step: a resumed stage whose checkpoint names an older best step still finds it
            self.dir.mkdir(exist_ok=True)
            atomic_write(self._file(step), lambda tmp: torch.save(model.state_dict(), tmp))
            return False
        self.waited += 1
        return self.waited >= s.patience

    def _file(self, step: int) -> Path:
        return self.dir / f"step-{step}.pt"

    def restore(self, model) -> dict[str, float]:
        """Load the best step's weights into `model`; returns the early_stop/* metrics. (`remove` the files once
        the stage has saved its model.)"""
        if self.best is not None:
            if not self._file(self.best_step).is_file():
                raise UserError(f"rl.early_stop: the weights of the best step {self.best_step} are missing from "
                                f"{self.dir}; rerun with --overwrite to train the stage again")
            model.load_state_dict(torch.load(self._file(self.best_step), map_location="cpu", weights_only=True))
        out = {"early_stop/best_step": float(self.best_step), "early_stop/best_value": float(self.best or 0.0)}
        if self.stopped_at is not None:
            out["early_stop/stopped_at"] = float(self.stopped_at)
        return out

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def early_stopped(ctx, stopper: EarlyStop, step: int) -> int:
    """Say why the stage stops at `step`; returns it (the step its final evaluation is logged at)."""
    s = stopper.settings
    print(f"{ctx.name}: early stop at step {step}: {s.metric} (smoothed) has not improved for {s.patience} steps; "
          f"keeping the policy of step {stopper.best_step} ({s.metric} {stopper.best:.4g})")
    stopper.stopped_at = step
    return step


def final_eval_and_save(ctx, accelerator, policy, metrics: dict, evaluate, counters: dict, timer: StepTimer,
                        max_steps: int, merged: bool = False) -> dict:
    """A policy stage's last step: final evaluation logged at `max_steps`, then the bare policy saved in Hugging Face
    format by the main process (the adapter, or with `merged` the merged model), through a temporary directory so
    that a kill or a full disk never leaves a half-written file beside the others. Returns `metrics` updated."""
    metrics = {**reduce_metrics(accelerator, metrics), **evaluate()}
    ctx.tracker.log({**metrics, **progress_axes(counters, timer)}, step=max_steps)
    # sharded parameters are gathered first, every process taking part: FSDP into the policy's whole-weight copy,
    # ZeRO-3 into one state dict
    bare = policy.unwrapped(accelerator)
    state_dict = accelerator.get_state_dict(policy.model) if sharded_parameters(accelerator) and not is_fsdp(accelerator) else None
    if accelerator.is_main_process:
        write_into(ctx.dir, lambda tmp: bare.save(tmp, merged=merged, state_dict=state_dict))
    accelerator.wait_for_everyone()
    return metrics
