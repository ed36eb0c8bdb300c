"""Asynchronous rollouts: a worker process samples step s with the policy weights of step s − k while the trainer
updates (AReaL's decoupled design, on one machine).

Versions: version v is the policy after v steps of the loop. The worker samples step s with exactly version
max(first, s − k), `first` being the version it started from (the start or resume step): which weights sampled
which step is a function of the step, not of timing, so a run repeats itself, and k = 0 is the synchronous loop in
two processes (the worker waits for each update). Weights travel through one shared-memory copy of the trainable
parameters; the trainer writes version v + 1 only once the worker has loaded v, so no version is torn or skipped.

The trainer learns with the decoupled PPO objective: the clipped ratio against π_prox (the weights the update
starts from, recomputed by the trainer) times the truncated importance weight min(π_prox / π_behav, cap) of the
stale behaviour policy that sampled (`importance_weights`); a fresh rollout (staleness 0) has weight 1 exactly.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from rlhf.config import AsyncSettings, ModelSettings, SamplingSettings


@dataclass
class WorkerRollout:
    """One step's samples from the worker."""

    step: int
    version: int  # the weights that sampled it
    prompt_indices: list[int]  # into the trainer's prompt records
    rollout: object  # rlhf.types.Rollout
    behaviour_logprobs: torch.Tensor | None  # (B, T) log π_behav at the sampling temperature; None when version = step
    seconds: float  # generate (+ behaviour log-probs) time in the worker


def importance_weights(prox_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                       cap: float) -> torch.Tensor:
    """min(π_prox / π_behav, cap) per token, 0 off the response mask (truncated importance sampling)."""
    ratio = torch.exp((prox_logprobs - behaviour_logprobs).clamp(max=20.0))
    return ratio.clamp(max=cap) * mask


def importance_stats(prox_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                     cap: float) -> dict[str, float]:
    """What the logs show of a stale rollout's importance weights: their mean after truncation, the largest ratio
    before it and the share of tokens truncated."""
    ratio = torch.exp(prox_logprobs - behaviour_logprobs)[mask]
    return {"async/is_weight_mean": float(importance_weights(prox_logprobs, behaviour_logprobs, mask, cap)[mask].mean()),
            "async/is_ratio_max": float(ratio.max()), "async/is_capped_frac": float((ratio > cap).float().mean())}


def prompt_indices(n_records: int, prompts_per_step: int, step: int, seed: int) -> list[int]:
    """The prompts of `step` (what the synchronous loop's first sampling round takes on one process)."""
    from rlhf.training import micro_batch_indices

    return micro_batch_indices(n_records, prompts_per_step, step, seed, 0, 1)


def _sampling_loop(model: ModelSettings, records, sampling: SamplingSettings, seed: int, prompts_per_step: int,
                   first: int, max_steps: int, staleness: int, threads: int, staging: dict, staged, loaded, out,
                   trainer: int) -> None:
    """The worker process: its own copy of the policy (built as the trainer built its own, then the trainer's
    current trainable weights), then steps first .. max_steps − 1 in order, each with its version's weights. Returns
    when the trainer process is gone (a SIGKILLed stage leaves no worker behind)."""
    from rlhf.policy import PolicyModel
    from rlhf.rollout import eval_mode, step_seed
    from rlhf.vision import images_for

    torch.set_num_threads(threads)
    policy = PolicyModel.load(model, with_reference=False, seed=seed)
    params = dict(policy.model.named_parameters())

    @torch.no_grad()
    def take_staged() -> None:
        for name, tensor in staging.items():
            params[name].copy_(tensor)

    take_staged()  # version `first`
    for step in range(first, max_steps):
        target = max(first, step - staleness)
        while loaded.value < target:  # take every published version in order up to the one this step samples with
            while staged.value <= loaded.value:
                if os.getppid() != trainer:
                    return
                time.sleep(0.0005)
            take_staged()
            loaded.value = staged.value
        started = time.perf_counter()
        idx = prompt_indices(len(records), prompts_per_step, step, seed)
        chosen = [records[i] for i in idx]
        with eval_mode(policy.model), torch.no_grad():
            rollout = policy.generate(
                [r["prompt"] for r in chosen], n=sampling.n, max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                seed=step_seed(seed, step), backend=sampling.backend, bf16=sampling.bf16, first_prompt=0,
                images=images_for(chosen, getattr(policy, "image_inputs", None)))
            behaviour = None
            if loaded.value < step:  # stale: the trainer needs what the sampling weights gave each token
                behaviour = policy.forward(rollout, sampling.temperature).logprobs * rollout.response_mask
        # pickled by value: a tensor shared through torch's queue dies with the worker that made it
        out.put(pickle.dumps(WorkerRollout(step, loaded.value, idx, rollout, behaviour, time.perf_counter() - started)))


class RolloutWorker:
    """The trainer's handle on the worker process: `get(step)` the step's rollout, `publish(model, version)` the
    weights after each update, `close()` at the end. A worker that dies is restarted from the trainer's current
    weights (those steps then sample fresh) up to `settings.max_restarts` times."""

    def __init__(self, policy, model: ModelSettings, records: list[dict], sampling: SamplingSettings,
                 settings: AsyncSettings, *, seed: int, prompts_per_step: int, start: int, max_steps: int):
        self.settings, self.max_steps = settings, max_steps
        self._ctx = mp.get_context("spawn")  # fork after OpenMP has run can hang the child
        # the worker loads `model` itself (a model pickled after its first forward carries unpicklable hooks)
        self._args = dict(model=model, records=records, sampling=sampling, seed=seed, prompts_per_step=prompts_per_step,
                          max_steps=max_steps, staleness=settings.max_staleness, threads=settings.worker_threads)
        self._staging = {n: p.detach().clone().share_memory_() for n, p in policy.model.named_parameters()
                         if p.requires_grad}
        self.restarts = 0
        self._current = policy  # the trainer's policy: a restarted worker starts from its weights
        self._spawn(start)

    def _spawn(self, first: int) -> None:
        """A worker sampling from step `first` with the weights in the staging buffer (version `first`)."""
        self._staged, self._loaded = self._ctx.Value("q", first), self._ctx.Value("q", first)
        self._out = self._ctx.Queue()
        self._process = self._ctx.Process(
            target=_sampling_loop, daemon=True, name="rlhf-rollout-worker",
            kwargs=dict(first=first, staging=self._staging, staged=self._staged, loaded=self._loaded, out=self._out,
                        trainer=os.getpid(), **self._args))
        self._process.start()

    def _restart(self, step: int, why: str) -> None:
        if self.restarts >= self.settings.max_restarts:
            raise RuntimeError(f"the rollout worker {why} at step {step} after {self.restarts} restarts: the stage "
                               "stops here; rerun the same command to resume from its last checkpoint")
        self.restarts += 1
        print(f"rollout worker {why} at step {step}: restarting it from the current weights "
              f"({self.restarts}/{self.settings.max_restarts})", flush=True)
        self._stop()
        self._copy_into_staging(self._current)
        self._spawn(step)

    def get(self, step: int) -> WorkerRollout:
        """The rollout of `step` (blocks until the worker has sampled it)."""
        deadline = time.monotonic() + self.settings.timeout_seconds
        while True:
            try:
                item = pickle.loads(self._out.get(timeout=0.2))
            except queue.Empty:
                if not self._process.is_alive():
                    self._restart(step, f"died (exit code {self._process.exitcode})")
                    deadline = time.monotonic() + self.settings.timeout_seconds
                elif time.monotonic() > deadline:
                    self._restart(step, f"sent nothing for {self.settings.timeout_seconds:.0f} s")
                    deadline = time.monotonic() + self.settings.timeout_seconds
                continue
            if item.step == step:
                return item
            # a step sampled before a restart: the trainer has moved past it

    def publish(self, policy, version: int) -> None:
        """Hand the weights of `version` (the policy after `version` steps) to the worker, once it has loaded the
        version before; skipped when no remaining step samples with it."""
        self._current = policy
        if version + self.settings.max_staleness >= self.max_steps:
            return
        while self._loaded.value < version - 1:
            if not self._process.is_alive():  # `get` restarts it, from these weights
                return
            time.sleep(0.0005)
        self._copy_into_staging(policy)
        self._staged.value = version

    def _copy_into_staging(self, policy) -> None:
        params = dict(policy.model.named_parameters())
        with torch.no_grad():
            for name, tensor in self._staging.items():
                tensor.copy_(params[name])

    def _stop(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10)
        self._out.cancel_join_thread()
        self._out.close()

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> "RolloutWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
