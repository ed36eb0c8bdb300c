"""Asynchronous rollouts (`rl.asynchronous`): staleness 0 is the synchronous loop exactly; stale rollouts are
weighted, logged and reproducible; a dead worker is restarted; a killed stage resumes; bad settings are refused."""

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.async_rollouts import RolloutWorker, importance_weights
from rlhf.config import AsyncSettings, ModelSettings, SamplingSettings, load_config
from rlhf.errors import UserError
from rlhf.pipeline import recipe, run_stage
from rlhf.policy import PolicyModel
from rlhf.stage import read_manifest
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]

COMPARED = ["loss/total", "loss/policy", "loss/kl", "train/reward", "train/kl", "train/grad_norm", "train/ratio_mean",
            "train/entropy"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("async-data")
    rows = [json.loads(x) for x in (ROOT / "data/demo/rl_prompts.jsonl").read_text().splitlines()]
    adds = [r for r in rows if r["task"] == "add"][:8]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in adds))
    return d


def _cfg(tmp_path, policy_dir, prompts_file, **overrides):
    # a length rule as well, so that rewards vary inside groups even for an untrained policy
    rewards = [{"name": "correct", "rule": "verifiable"},
               {"name": "short", "rule": "length_penalty", "params": {"max_words": 1}, "weight": 0.5}]
    base = {
        "output_dir": str(tmp_path / "out"), "model.path": str(policy_dir), "data.prompts": str(prompts_file / "train.jsonl"),
        "rewards": rewards, "sampling.n": 4, "sampling.max_new_tokens": 6, "rl.prompts_per_step": 2,
        "rl.micro_batch_size": 4, "train.max_steps": 2, "train.log_every": 1, "optim.lr": 1e-2,
        "reward.missing_eos_score": None, "eval.prompts": None, "samples_every": 1, "tracking.mode": "disabled",
    }
    return load_config(recipe("grpo").Config, None, {**base, **overrides})


def _rlhf(*args):
    return subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _rows(out):
    return {r["step"]: r for r in read_metrics(out) if "perf/update_seconds" in r}


def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_staleness_zero_is_the_synchronous_loop_exactly(tmp_path, policy_dir, prompts_file):
    settings = {"train.max_steps": 3, "rl.epochs": 2, "kl.beta": 0.05}
    run_stage("grpo", _cfg(tmp_path / "sync", policy_dir, prompts_file, **settings))
    run_stage("grpo", _cfg(tmp_path / "async", policy_dir, prompts_file, **settings,
                           **{"rl.asynchronous": {"max_staleness": 0}}))
    sync, asynchronous = _rows(tmp_path / "sync" / "out"), _rows(tmp_path / "async" / "out")
    assert sorted(sync) == sorted(asynchronous) == [1, 2, 3]
    for step in sync:
        assert {k: sync[step][k] for k in COMPARED} == {k: asynchronous[step][k] for k in COMPARED}, step
        assert asynchronous[step]["async/staleness"] == 0 and "async/is_weight_mean" not in asynchronous[step]
    assert asynchronous[1]["train/first_minibatch_ratio_mean"] == 1.0 and asynchronous[1]["train/kl"] == 0.0
    assert _samples(tmp_path / "sync" / "out") == _samples(tmp_path / "async" / "out"), "the same completions"
    a, b = load_file(tmp_path / "sync" / "out" / "model.safetensors"), load_file(tmp_path / "async" / "out" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stale_rollouts_are_weighted_logged_and_reproducible(tmp_path, policy_dir, prompts_file):
    settings = {"train.max_steps": 4, "rl.asynchronous": {"max_staleness": 2, "importance_cap": 1.5}, "optim.lr": 0.05}
    for run in ("a", "b"):
        run_stage("grpo", _cfg(tmp_path / run, policy_dir, prompts_file, **settings))
    first, second = _rows(tmp_path / "a" / "out"), _rows(tmp_path / "b" / "out")
    assert [first[s]["async/staleness"] for s in sorted(first)] == [0, 1, 2, 2], "step s samples with version max(0, s − k)"
    assert first[1]["train/kl"] == 0.0, "step 0 samples with the reference's own weights"
    for step in (3, 4):
        assert 0 < first[step]["async/is_weight_mean"] <= 1.5 and first[step]["async/is_ratio_max"] > 0
        # π_old = π_prox, recomputed over the first minibatch's own micro-batches: its ratio is exactly 1
        assert first[step]["train/first_minibatch_ratio_mean"] == 1.0
        assert 0 <= first[step]["async/is_capped_frac"] <= 1
    assert all(math.isfinite(first[s]["loss/total"]) for s in first)
    same = COMPARED + ["async/staleness", "async/is_weight_mean", "async/is_ratio_max", "async/is_capped_frac"]
    assert [[first[s].get(k) for k in same] for s in first] == [[second[s].get(k) for k in same] for s in first], \
        "which weights sampled which step is a function of the step: two runs agree"
    assert read_manifest(tmp_path / "a" / "out")["status"] == "complete"


def test_importance_weights_are_truncated_and_masked():
    prox = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    behaviour = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    mask = torch.tensor([[True, True, False]])
    assert torch.allclose(importance_weights(prox, behaviour, mask, cap=1.5), torch.tensor([[1.5, 0.5, 0.0]]))


def _worker(policy_dir, **settings):
    model = ModelSettings(path=str(policy_dir))
    policy = PolicyModel.load(model, with_reference=False, seed=0)
    records = [{"prompt": f"{a} + {a} ="} for a in range(6)]
    sampling = SamplingSettings(n=2, max_new_tokens=4)
    return policy, RolloutWorker(policy, model, records, sampling, AsyncSettings(**settings), seed=0,
                                 prompts_per_step=2, start=0, max_steps=4)


def test_a_dead_worker_is_restarted_from_the_current_weights_then_the_stage_stops(policy_dir, capsys):
    policy, worker = _worker(policy_dir, max_staleness=0, max_restarts=1)
    try:
        first = worker.get(0)
        assert (first.step, first.version, first.behaviour_logprobs) == (0, 0, None)
        worker._process.kill()
        worker.publish(policy, 1)
        again = worker.get(1)
        assert (again.step, again.version, worker.restarts) == (1, 1, 1)
        assert "rollout worker died (exit code -9) at step 1: restarting it" in capsys.readouterr().out
        worker._process.kill()
        with pytest.raises(RuntimeError, match="rerun the same command to resume from its last checkpoint"):
            worker.get(2)
    finally:
        worker.close()


def test_sigkill_of_an_async_stage_resumes_to_the_same_final_metrics(tmp_path, kill_and_resume, policy_dir,
                                                                      prompts_file):
    args = ["grpo", f"model.path={policy_dir}", f"data.prompts={prompts_file / 'train.jsonl'}", "sampling.n=4",
            "sampling.max_new_tokens=6", "rl.prompts_per_step=2", "train.max_steps=6", "train.save_every=2",
            "train.log_every=1", "optim.lr=0.01", "eval.prompts=null", "tracking.mode=disabled",
            "rl.asynchronous.max_staleness=0"]
    ref = _rlhf(*args, f"output_dir={tmp_path / 'ref'}")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    text = kill_and_resume(args, tmp_path / "run")
    assert "resuming grpo from step-" in text
    assert read_manifest(tmp_path / "run")["metrics"] == pytest.approx(read_manifest(tmp_path / "ref")["metrics"],
                                                                       rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("stage,overrides,message", [
    ("grpo", {"loss.dynamic_sampling": True}, "cannot refill a batch"),
    ("ppo", {}, "is grpo's (ppo samples in the loop)"),
])
def test_settings_async_cannot_do_are_refused_in_one_line(tmp_path, policy_dir, prompts_file, stage, overrides, message):
    base = _cfg(tmp_path, policy_dir, prompts_file).model_dump()
    cfg = {"output_dir": str(tmp_path / stage), "model.path": str(policy_dir), "data.prompts": base["data"]["prompts"],
           "rl.asynchronous": {"max_staleness": 1}, "tracking.mode": "disabled", "train.max_steps": 1,
           "rl.prompts_per_step": 2, "sampling.n": 2,
           "eval.prompts": None, **overrides}
    if stage == "ppo":
        cfg["rewards"] = [{"name": "correct", "rule": "verifiable"}]
    with pytest.raises(UserError, match=re.escape(message)):
        run_stage(stage, load_config(recipe(stage).Config, None, cfg))
