"""Scale-out on CPU: every trainable stage under `accelerate launch` with two processes (gloo), under DDP and under
FSDP2 (parameters sharded), gives what one process gives for the same global batch and seed, and a checkpoint moves
between process counts (FSDP's sharded checkpoints too).

One pipeline holds a tiny pretrain, sft, reward, dpo, grpo and ppo stage (each on fixed inputs, so each is compared on its
own). It runs once on one process (micro-batches accumulated: `grad_accum` 2, or all prompts in one rollout) and on
two, once per engine (`grad_accum` 1, half the prompts per process): the same global batch, split differently.
Compared step by step: the logged losses, rewards and gradient norms, the final gold evaluation (sharded over the
processes) and the saved weights.

Tolerance: a batch split over processes is padded differently and summed in another order, so results agree to
float32 rounding, not bit for bit: 2e-4 relative (+1e-5 absolute) on metrics, 1e-4 absolute on weights after the
last step. Sampling draws from per-prompt streams, so the two runs sample the same completions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf.stage import read_manifest
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RTOL, ATOL, WEIGHT_ATOL = 2e-4, 1e-5, 1e-4

# the metrics compared per stage, at every logged step
COMPARED = {
    "pretrain": ["loss/total", "train/grad_norm", "train/lr"],
    "sft": ["loss/total", "train/grad_norm", "train/lr"],
    "reward": ["loss/total", "train/accuracy", "train/grad_norm"],
    "dpo": ["loss/total", "loss/dpo", "train/accuracy", "train/margin", "train/grad_norm"],
    "grpo": ["loss/total", "loss/policy", "loss/kl", "train/reward", "train/reward_std", "train/kl", "train/kl_coef",
             "train/grad_norm"],
    "ppo": ["loss/total", "loss/policy", "loss/value", "train/reward", "train/reward_std", "train/kl", "train/kl_coef",
            "train/advantage_std", "value/explained_var", "train/grad_norm"],
}
# how one process holds the same global batch as two: accumulated micro-batches, or twice the prompts
ONE_PROCESS = {"pretrain": {"train.grad_accum": 2}, "sft": {"train.grad_accum": 2},
               "reward": {"train.grad_accum": 2}, "dpo": {"train.grad_accum": 2},
               "grpo": {"rl.prompts_per_step": 4, "rl.micro_batch_size": 8},
               "ppo": {"rl.prompts_per_step": 4, "rl.micro_batch_size": 8}}
TWO_PROCESSES = {"pretrain": {"train.grad_accum": 1}, "sft": {"train.grad_accum": 1},
                 "reward": {"train.grad_accum": 1}, "dpo": {"train.grad_accum": 1},
                 "grpo": {"rl.prompts_per_step": 2, "rl.micro_batch_size": 4},
                 "ppo": {"rl.prompts_per_step": 2, "rl.micro_batch_size": 4}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A nano policy with the action tokens, a random nano reward model, and small data files of the demo world."""
    from reward_models.model import RewardModel
    from rlhf.policy import add_special_tokens, load_tokenizer
    from rlhf.world import build_tiny_lm

    d = tmp_path_factory.mktemp("mp-inputs")
    tok = load_tokenizer(str(ROOT / "data/demo/tokenizer"))
    model = build_tiny_lm(tok, "nano", seed=0)
    add_special_tokens(model, tok, ["<add>", "<review>"])
    model.save_pretrained(d / "policy")
    tok.save_pretrained(d / "policy")
    torch.manual_seed(1)
    rm = RewardModel.from_backbone(str(d / "policy"))
    rm.set_stats(torch.tensor([0.3, -0.1, 0.5, 0.1]), "test")
    rm.save(d / "rm")

    def rows(name):
        return [json.loads(x) for x in (ROOT / "data/demo" / name).read_text().splitlines()]

    def write(name, items):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in items))

    write("pretrain.jsonl", rows("pretrain.jsonl")[:200])
    write("sft.jsonl", rows("sft.jsonl")[:48])
    write("pairs.jsonl", rows("preferences_example.jsonl")[:64])
    write("review_prompts.jsonl", [r for r in rows("rl_prompts.jsonl") if r["task"] == "review"][:16])
    write("add_prompts.jsonl", [r for r in rows("rl_prompts.jsonl") if r["task"] == "add"][:16])
    evals = rows("eval_prompts.jsonl")
    write("eval.jsonl", [r for r in evals if r["task"] == "add"][:3] + [r for r in evals if r["task"] == "review"][:3])
    return d


def stage_overrides(d: Path) -> dict[str, dict]:
    """Each stage's settings in the pipeline (the per-process batch split is added per run)."""
    gen = {"max_new_tokens": 6, "batch_size": 2, "samples": 2}  # 3 eval batches: uneven over 2 processes
    rl_common = {
        "model.path": str(d / "policy"), "sampling.n": 2, "sampling.max_new_tokens": 6, "rl.epochs": 2,
        "rl.minibatches": 1, "train.max_steps": 3, "train.log_every": 1, "train.eval_every": 2, "optim.lr": 1e-2,
        "eval.prompts": str(d / "eval.jsonl"), "eval.generation": gen, "samples_every": 0,
    }
    return {
        "pretrain": {"model.scratch_size": "nano", "model.tokenizer": str(ROOT / "data/demo/tokenizer"),
                     "data.train": str(d / "pretrain.jsonl"), "data.block_size": 32, "data.eval_fraction": 0.05,
                     "train.batch_size": 2, "train.max_steps": 3, "train.log_every": 1},
        "sft": {"model.path": str(d / "policy"), "action_tokens": [], "data.train": str(d / "sft.jsonl"),
                "data.eval_fraction": 0.1, "data.gold_prompts": str(d / "eval.jsonl"), "generation": gen,
                "train.batch_size": 2, "train.max_steps": 6, "train.log_every": 1, "train.eval_every": 3,
                "train.save_every": 2, "optim.lr": 3e-3},
        "reward": {"model.path": str(d / "policy"), "model.max_length": 48, "data.train": str(d / "pairs.jsonl"),
                   "data.eval_fraction": 0.25, "train.batch_size": 4, "train.max_steps": 3, "train.log_every": 1,
                   "stats.num_samples": 8, "optim.lr": 3e-3},
        "dpo": {"model.path": str(d / "policy"), "data.train": str(d / "pairs.jsonl"), "data.ties": "drop",
                "data.eval_fraction": 0.25, "train.batch_size": 2, "train.max_steps": 3, "train.log_every": 1,
                "optim.lr": 1e-2, "eval.gold_prompts": str(d / "eval.jsonl"), "eval.generation": gen,
                "precompute_ref": True, "eval.batch_size": 4},  # reference log-probs: batches split over processes
        "grpo": {**rl_common, "data.prompts": str(d / "add_prompts.jsonl"), "kl.beta": 0.05, "kl.target": 1.0,
                 "train.save_every": 1,
                 "rewards": [{"name": "correct", "rule": "verifiable"},
                             {"name": "short", "rule": "length_penalty", "params": {"max_words": 1}, "weight": 0.5}]},
        "ppo": {**rl_common, "data.prompts": str(d / "review_prompts.jsonl"), "kl.beta": 0.1, "kl.target": 1.0,
                "reward.whiten": "center",
                "rewards": [{"name": "rm", "model": str(d / "rm"), "weight": 1.0},
                            {"name": "short", "rule": "length_penalty", "params": {"max_words": 2}, "weight": 0.5}],
                "eval.rewards": [{"name": "short", "rule": "length_penalty", "params": {"max_words": 2}}],
                "train.save_every": 1},
    }


def write_pipeline(d: Path, out: Path, split: dict[str, dict], path: Path) -> Path:
    stages = [{"name": kind, "kind": kind, "overrides": {**settings, **split[kind]}}
              for kind, settings in stage_overrides(d).items()]
    # `rlhf eval` of two policies: prompts sharded over the processes, the paired CIs from the gathered scores
    stages.append({"name": "eval", "kind": "eval", "inputs": {"models.grpo": "grpo"},
                   "overrides": {"models.base": str(d / "policy"), "prompts": str(d / "eval.jsonl"),
                                 "generation": {"max_new_tokens": 6, "batch_size": 2, "samples": 2}}})
    path.write_text(yaml.safe_dump({"name": "mp", "output_dir": str(out), "seed": 0, "tracking": {"mode": "disabled"},
                                    "stages": stages}))
    return path


# how each compared run is launched: (processes, the shipped accelerate config)
LAUNCHES = {"one": (1, None), "ddp": (2, "ddp"), "fsdp": (2, "fsdp"), "fsdp-1": (1, "fsdp")}


def command(launch: str, *args: str) -> list[str]:
    processes, engine = LAUNCHES[launch]
    if engine is None:
        return [sys.executable, "-m", "rlhf.cli", *args]
    with socket.socket() as sock:  # a free rendezvous port: other jobs on the machine may hold accelerate's 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs/accelerate" / f"{engine}.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(port), "-m", "rlhf.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RLHF_COMPILE": "0"}


def split_of(launch: str) -> dict[str, dict]:
    return ONE_PROCESS if LAUNCHES[launch][0] == 1 else TWO_PROCESSES


def run(launch: str, *args: str) -> str:
    proc = subprocess.run(command(launch, *args), cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict[str, Path]:
    """The pipeline's output directory after each launch: one process, two under DDP, two under FSDP2."""
    tmp = tmp_path_factory.mktemp("mp-runs")
    out, printed = {}, {}
    for launch in ("one", "ddp", "fsdp"):
        out[launch] = tmp / launch
        printed[launch] = run(launch, "run", str(write_pipeline(inputs, out[launch], split_of(launch), tmp / f"{launch}.yaml")))
    assert "FSDP2 on CPU" in printed["fsdp"] and "FSDP2 on CPU" not in printed["ddp"], "FSDP ran as FSDP, not as DDP"
    return out


def train_rows(stage_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(stage_dir) if "train/grad_norm" in r}


def close(a: float, b: float) -> bool:
    return abs(a - b) <= ATOL + RTOL * abs(a)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.parametrize("stage", list(COMPARED))
def test_two_processes_match_one(runs, stage, engine):
    one, two = train_rows(runs["one"] / stage), train_rows(runs[engine] / stage)
    assert one and sorted(one) == sorted(two), "the same steps are logged, once (by the main process)"
    mismatches = [(step, key, one[step][key], two[step][key]) for step in one for key in COMPARED[stage]
                  if key in one[step] and not close(one[step][key], two[step][key])]
    assert not mismatches, mismatches
    assert all(key in one[max(one)] for key in COMPARED[stage]), set(COMPARED[stage]) - set(one[max(one)])

    final_one, final_two = read_manifest(runs["one"] / stage)["metrics"], read_manifest(runs[engine] / stage)["metrics"]
    evals = [k for k in final_one if k.startswith("eval/")]
    assert evals and {k for k in final_two if k.startswith("eval/")} == set(evals)
    assert [k for k in evals if not close(final_one[k], final_two[k])] == []

    # the final model is saved whole, in the same HF layout, whatever the engine
    weights_one, weights_two = load_file(runs["one"] / stage / "model.safetensors"), load_file(runs[engine] / stage / "model.safetensors")
    assert set(weights_one) == set(weights_two) and all(weights_two[k].shape == weights_one[k].shape for k in weights_one)
    worst = max(float((weights_one[k] - weights_two[k]).abs().max()) for k in weights_one)
    assert worst <= WEIGHT_ATOL, worst
    assert read_manifest(runs[engine] / stage)["fingerprint"] == read_manifest(runs["one"] / stage)["fingerprint"], \
        "the same global batch is the same config, however it is split"


def test_gold_evaluation_is_sharded_not_repeated(runs):
    """Each process generates half of the eval batches: the two-process sft stage's eval sees every prompt once."""
    one = [r for r in read_metrics(runs["one"] / "sft") if "eval/gold_score" in r]
    two = [r for r in read_metrics(runs["ddp"] / "sft") if "eval/gold_score" in r]
    assert len(one) == len(two) == 2 and all(a["eval/sampled/k"] == b["eval/sampled/k"] == 2 for a, b in zip(one, two))


def test_eval_stage_scores_every_prompt_once_over_two_processes(runs):
    one, two = (json.loads((runs[launch] / "eval" / "results.json").read_text()) for launch in ("one", "ddp"))
    assert one["per_prompt"] == two["per_prompt"] and len(one["per_prompt"]["grpo"]["greedy"]) == 6
    assert one["comparisons"] == two["comparisons"]


def kill_at_first_checkpoint(cmd: list[str], out: Path) -> None:
    """Start `cmd` and SIGKILL it with every process it started (the launcher's workers run in sessions of their
    own) as soon as a checkpoint is complete."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list((out / "checkpoints").glob("step-*")), "no checkpoint appeared before the run ended"
    tree = psutil.Process(proc.pid)
    for child in [tree, *tree.children(recursive=True)]:
        child.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(out)["status"] == "running", "a killed stage must not look complete"


@pytest.mark.parametrize("stage,first,then", [("sft", "ddp", "one"), ("sft", "one", "ddp"), ("grpo", "ddp", "one"),
                                               ("sft", "fsdp", "fsdp-1"), ("ppo", "fsdp", "fsdp")],
                         ids=["sft-ddp-to-1", "sft-1-to-ddp", "grpo-ddp-to-1", "sft-fsdp-to-fsdp-1", "ppo-fsdp-to-fsdp"])
def test_checkpoint_resumes_on_another_process_count(inputs, runs, tmp_path, stage, first, then):
    """A stage killed at its first checkpoint under launch `first`, resumed under `then` with the same global batch:
    it continues from the checkpoint and ends where an uninterrupted run ends."""
    settings = stage_overrides(inputs)[stage]

    def args(launch):
        return [stage, *(f"{k}={json.dumps(v)}" for k, v in {**settings, **split_of(launch)[stage]}.items()),
                f"output_dir={tmp_path / stage}", "seed=0", "tracking.mode=disabled"]

    kill_at_first_checkpoint(command(first, *args(first)), tmp_path / stage)
    printed = run(then, *args(then))
    assert f"resuming {stage} from step-" in printed
    resumed, straight = train_rows(tmp_path / stage), train_rows(runs["one"] / stage)
    assert sorted(resumed) == sorted(straight)
    assert all(close(straight[s]["loss/total"], resumed[s]["loss/total"]) for s in straight), (straight, resumed)
    assert read_manifest(tmp_path / stage)["status"] == "complete"


def test_a_sharded_checkpoint_resumed_without_fsdp_says_how_in_one_line(inputs, tmp_path):
    """FSDP's checkpoints are sharded (torch.distributed.checkpoint): resuming one on a launch without FSDP names the
    launch that can, instead of failing deep inside accelerate."""
    settings = {**stage_overrides(inputs)["sft"], **ONE_PROCESS["sft"]}
    args = ["sft", *(f"{k}={json.dumps(v)}" for k, v in settings.items()), f"output_dir={tmp_path / 'sft'}", "seed=0",
            "tracking.mode=disabled"]
    kill_at_first_checkpoint(command("fsdp-1", *args), tmp_path / "sft")
    proc = subprocess.run(command("one", *args), cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "it was saved sharded by FSDP; launch it with an FSDP accelerate config" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the shipped engine configs and what each refuses --------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_shipped_accelerate_configs_load_and_say_what_they_are_for(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs/accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    header = path.read_text().split("compute_environment")[0]
    assert header.count("\n#") >= 3 and "accelerate launch --config_file" in header


def test_engines_refuse_what_they_cannot_do_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhf.errors import UserError
    from rlhf.distributed import check_engine, sharded_parameters

    def engine(kind, stage=None):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    ddp, fsdp = engine(DistributedType.MULTI_GPU), engine(DistributedType.FSDP)
    zero2, zero3 = engine(DistributedType.DEEPSPEED, 2), engine(DistributedType.DEEPSPEED, 3)
    assert [sharded_parameters(e) for e in (ddp, fsdp, zero2, zero3)] == [False, True, False, True]
    check_engine(ddp, micro_batches=4, generates="grpo's rollouts", merges="save_merged")
    check_engine(zero2, micro_batches=1, generates="grpo's rollouts")
    check_engine(fsdp, micro_batches=4, generates="grpo's rollouts", merges="save_merged")  # gathers whole weights
    with pytest.raises(UserError, match="accumulates 2 micro-batches per optimizer step: set train.grad_accum: 1"):
        check_engine(zero2, micro_batches=2)
    with pytest.raises(UserError, match="grpo's rollouts needs the policy's whole weights on every process, and "
                                        "DeepSpeed ZeRO-3 shards them"):
        check_engine(zero3, micro_batches=1, generates="grpo's rollouts")
    from rlhf.recipes.rl_settings import rl_micro_batches
    from rlhf.config import RLSettings

    assert rl_micro_batches(RLSettings(prompts_per_step=4, minibatches=2, micro_batch_size=3), n=4) == 3  # 8 rows / 3


def test_deepspeed_on_cpu_is_refused_not_run_as_ddp(monkeypatch):
    """accelerate files a DeepSpeed launch on a machine without a GPU as plain multi-CPU DDP; a stage must not log
    ZeRO numbers that DDP produced."""
    from rlhf.config import TrainSettings
    from rlhf.distributed import make_accelerator
    from rlhf.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed runs on GPUs here .* launch with configs/accelerate/fsdp.yaml"):
        make_accelerator(TrainSettings(), seed=0)
