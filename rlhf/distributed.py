"""Several processes: the process group, the per-stage Accelerator, metrics reduced over processes, and what each
distributed engine (DDP, FSDP, DeepSpeed) can do. One process is the special case where all of this is a no-op."""

from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import torch

from rlhf.errors import UserError


def process_state():
    """accelerate's `PartialState` of this process. Started by `torchrun` / `accelerate launch` (LOCAL_RANK set) on a
    machine without a GPU, the processes form a gloo group on CPU: accelerate's default would leave each one a
    separate single-process run (its own multi-CPU mode needs MPI)."""
    from accelerate import PartialState

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
    return PartialState(cpu=launched and not torch.cuda.is_available())


def make_accelerator(train, seed: int):
    """An Accelerator for this stage (fresh state, so stages with different precision can share a process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    state = process_state()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # step_scheduler_with_optimizer=False: accelerate otherwise steps a prepared scheduler once per process at every
    # optimizer step (it assumes max_steps shrinks with more processes); ours count global optimizer steps
    accelerator = Accelerator(mixed_precision="bf16" if train.precision == "bf16" else "no",
                              step_scheduler_with_optimizer=False, cpu=state.device.type == "cpu")
    set_seed(seed)
    return accelerator


def reduce_metrics(accelerator, metrics: dict) -> dict[str, float]:
    """One row of metrics for all processes: each key's mean over the processes that logged it (the max for
    perf/peak_rss_gb). Every process holds an equal share of the global batch, so the mean of per-process means is
    the global mean, and a loss computed as its share of a global normalizer (ours are) averages to the global loss.
    Every process must call this."""
    values = {k: float(v) for k, v in metrics.items()}
    if accelerator.num_processes == 1:
        return values
    from accelerate.utils import gather_object

    rows = gather_object([values])
    keys = dict.fromkeys(k for row in rows for k in row)
    combine = {"perf/peak_rss_gb": max}
    return {k: combine.get(k, lambda v: sum(v) / len(v))([row[k] for row in rows if k in row]) for k in keys}


T = TypeVar("T")


def map_over_processes(fn: Callable[..., T], items: Sequence, accelerator=None, desc: str | None = None) -> list[T]:
    """`[fn(item) for item in items]` with the items dealt round-robin to the processes, each computing its share;
    every process gets all results, in the items' order (so every process must call this). `desc`: a progress bar."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = list(enumerate(items))[rank::world]
    if desc is not None:
        from rlhf.tracking import progress

        mine = progress(mine, total=len(mine), desc=desc)
    done = [(i, fn(item)) for i, item in mine]
    if world > 1:
        from accelerate.utils import gather_object

        done = gather_object(done)
    return [result for _, result in sorted(done, key=lambda pair: pair[0])]


def sync_unless_last(accelerator, models, index: int, count: int):
    """Skip the DDP gradient all-reduce on all but the last micro-batch of an optimizer step. `models`: one trained
    module or several (a policy and its critic)."""
    from contextlib import ExitStack

    stack = ExitStack()
    if index != count - 1:
        for model in models if isinstance(models, (list, tuple)) else [models]:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def global_normalizer(accelerator, local: torch.Tensor | float) -> torch.Tensor:
    """A loss normalizer over every process's micro-batches, divided by the number of processes: DDP averages the
    processes' gradients, so each process divides its share by (global count / processes) and the average of the
    gradients is the gradient of (global sum / global count). `local`: this process's count for one optimizer step."""
    local = torch.as_tensor(local, dtype=torch.float32, device=accelerator.device)
    return accelerator.reduce(local, "sum") / accelerator.num_processes


def prepare_reference(accelerator, policy) -> None:
    """Run a policy's frozen reference copy (if it keeps one) the way the policy runs: accelerate's mixed-precision
    wrapper on its forward (bf16 autocast), no data-parallel wrapper. Under LoRA the reference is the policy's own
    base and needs nothing."""
    if policy.ref_model is not None:
        policy.ref_model = accelerator.prepare_model(policy.ref_model, evaluation_mode=True)


def sharded_parameters(accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3: outside a forward pass no process holds whole weights."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def check_engine(accelerator, *, micro_batches: int = 1, generates: str | None = None, merges: str | None = None,
                 modules: int = 1) -> None:
    """Refuse, in one line, what the launched engine cannot do right (DDP can do everything here).

    `micro_batches`: micro-batches per optimizer step (DeepSpeed steps the optimizer inside every backward pass);
    `generates`: what samples with the policy being trained (the samplers read whole weights); `merges`: what merges
    LoRA weights into a copy of the model (needs whole weights too); `modules`: trained modules prepared together
    (DeepSpeed takes one model per Accelerator)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and modules > 1:
        raise UserError(f"DeepSpeed trains one model per run, and this stage trains {modules} (PPO's policy and critic "
                        "modules): launch with configs/accelerate/ddp.yaml")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and micro_batches > 1:
        raise UserError(f"DeepSpeed steps the optimizer inside each backward pass, and this stage accumulates "
                        f"{micro_batches} micro-batches per optimizer step: set train.grad_accum: 1 (grpo / ppo: "
                        "rl.micro_batch_size >= the rows of a minibatch), or launch with configs/accelerate/ddp.yaml")
    for what in (generates, merges):
        if what and sharded_parameters(accelerator):
            raise UserError(f"{what} needs the policy's whole weights on every process, and FSDP / DeepSpeed ZeRO-3 "
                            "shard them: launch with configs/accelerate/ddp.yaml or zero2.yaml, or turn it off")
