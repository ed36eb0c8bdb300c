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
    if state.device.type == "cpu" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # accelerate ignores DeepSpeed on CPU and runs plain DDP: refuse rather than report ZeRO that never ran
        raise UserError("DeepSpeed runs on GPUs here (on CPU accelerate would run plain DDP under its name): launch "
                        "with configs/accelerate/fsdp.yaml to shard on CPU, or configs/accelerate/ddp.yaml")
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # step_scheduler_with_optimizer=False: accelerate otherwise steps a prepared scheduler once per process at every
    # optimizer step (it assumes max_steps shrinks with more processes); ours count global optimizer steps
    accelerator = Accelerator(mixed_precision="bf16" if train.precision == "bf16" else "no",
                              step_scheduler_with_optimizer=False, cpu=state.device.type == "cpu")
    if state.device.type == "cpu" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        _fsdp_on_cpu(accelerator)
    set_seed(seed)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Run an FSDP launch (`configs/accelerate/fsdp.yaml`) as FSDP on a CPU gloo group too. accelerate builds the
    FSDP plugin from the launch config but files a multi-process CPU run as MULTI_CPU and wraps it in DDP, silently
    dropping the sharding; torch's `fully_shard` itself runs on gloo, so the engine is set to FSDP here, as accelerate
    sets it for GPUs, and everything after (prepare, clipping, save / load state) is accelerate's own FSDP2 path."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the launch config (FSDP_* environment variables)
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU runs FSDP2 only (torch's fully_shard): set fsdp_version: 2 in the accelerate config")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # both: every `AcceleratorState()` accelerate builds internally (save_state does) copies the engine from PartialState
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    _return_large_frees_to_the_os()
    accelerator.print(f"FSDP2 on CPU: {accelerator.num_processes} processes over gloo, parameters sharded")


def _return_large_frees_to_the_os(threshold: int = 1 << 16) -> None:
    """Serve allocations above `threshold` bytes with their own mappings, unmapped when freed. FSDP all-gathers each
    layer's weights and frees them after use; glibc's default raises its mmap threshold to the largest block freed,
    so after the first step those buffers come from the heap, stay resident, and a sharded process holds as much as
    a DDP one. (GPUs have their own allocator; this is the CPU path.)"""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, threshold)  # M_MMAP_THRESHOLD; fixed from here on
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


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
        policy.ref_model = shard_frozen(accelerator, accelerator.prepare_model(policy.ref_model, evaluation_mode=True))


class WholeWeights:
    """A trained module's whole weights on every process while accelerate shards them (FSDP2), for what reads
    weights outside the wrapper's forward: sampling, saving. The hybrid-engine way (verl's FSDP workers): an unsharded
    copy, taken before `accelerator.prepare` and refreshed from the shards (an all-gather per tensor) when asked for.
    Without sharding there is no copy and `get` is accelerate's unwrap. Every process must call `get` (a collective)."""

    def __init__(self, accelerator, module: torch.nn.Module):
        import copy

        self.accelerator = accelerator
        self.copy = copy.deepcopy(module).requires_grad_(False) if is_fsdp(accelerator) else None

    def get(self, prepared: torch.nn.Module) -> torch.nn.Module:
        if self.copy is None:
            return self.accelerator.unwrap_model(prepared)
        from torch.distributed.tensor import DTensor

        mine = dict(self.copy.named_parameters())
        with torch.no_grad():
            for name, param in prepared.named_parameters():
                mine[name].copy_(param.full_tensor() if isinstance(param, DTensor) else param)
        self.copy.train(prepared.training)
        return self.copy


def shard_frozen(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """Under FSDP, shard a frozen module (the reference policy) like the trained ones. accelerate prepares FSDP2
    modules only together with an optimizer, so this applies torch's `fully_shard` itself."""
    if is_fsdp(accelerator):
        _fully_shard_tree(accelerator, module)
    return module


def shard_together(accelerator, modules: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """Under FSDP, several trained modules (PPO's policy, value head, critic) as one container for
    `accelerator.prepare`, which takes one FSDP2 model per call: each module is sharded as a tree of its own (it runs
    its own forward), the container is an FSDP unit with no parameters of its own, so accelerate keeps the sharding
    and maps the optimizer (built after this) onto the sharded parameters one to one."""
    from torch.distributed.fsdp import fully_shard

    for module in modules:
        _fully_shard_tree(accelerator, module)
    together = _Together(modules)
    fully_shard(together, **_shard_options(accelerator))
    return together


class _Together(torch.nn.Module):
    """The container `shard_together` hands accelerate (fully_shard takes no bare ModuleList)."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the modules run their own forward")


def _fully_shard_tree(accelerator, module: torch.nn.Module) -> None:
    """One FSDP unit per decoder layer (the model's `_no_split_modules`, what the launch config's
    TRANSFORMER_BASED_WRAP picks), then the rest of the module as the root unit."""
    from torch.distributed.fsdp import fully_shard

    inner = getattr(module, "get_base_model", lambda: module)()  # a peft model keeps the HF model inside
    blocks = set(getattr(inner, "_no_split_modules", None) or getattr(module, "_no_split_modules", None) or [])
    options = _shard_options(accelerator)
    for sub in module.modules():
        if sub is not module and type(sub).__name__ in blocks:
            fully_shard(sub, **options)
    fully_shard(module, **options)


def _shard_options(accelerator) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    return {"reshard_after_forward": plugin.reshard_after_forward,
            "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


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
    for what in (generates, merges):  # FSDP gathers whole weights for them (`WholeWeights`); ZeRO-3 cannot here
        if what and sharded_parameters(accelerator) and not is_fsdp(accelerator):
            raise UserError(f"{what} needs the policy's whole weights on every process, and DeepSpeed ZeRO-3 shards "
                            "them: launch with configs/accelerate/fsdp.yaml, ddp.yaml or zero2.yaml, or turn it off")
