"""rl.early_stop: an RL stage stops on a gold-free step metric and keeps the policy of its best step."""

import pytest
import torch
from safetensors.torch import load_file

from rlhf.errors import UserError
from rlhf.pipeline import recipe, run_stage

from .test_grpo import _cfg, prompts_file  # noqa: F401 - the module's prompt fixture

STOP = {"metric": "train/lr", "mode": "max", "patience": 2, "smoothing": 0.0}  # a constant lr never improves


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_a_stalled_signal_stops_the_stage_with_the_best_steps_policy(tmp_path, policy_dir, prompts_file, kind):  # noqa: F811
    def run(out, **overrides):
        cfg = _cfg(tmp_path / out, policy_dir, prompts_file, **overrides)
        if kind == "ppo":  # the same settings, read by the PPO recipe
            settings = cfg.model_dump(mode="json", include={"output_dir", "model", "data", "rewards", "sampling", "rl",
                                                            "train", "optim", "reward", "eval", "samples_every",
                                                            "tracking"})
            cfg = recipe("ppo").Config.model_validate(settings)
        return run_stage(kind, cfg), tmp_path / out / "out"

    stopped, out = run("stopped", **{"train.max_steps": 6, "rl.early_stop": STOP})
    # best at step 1 (the first value), then two steps without a better one: stop after step 3
    assert stopped["metrics"]["early_stop/best_step"] == 1.0 and stopped["metrics"]["early_stop/stopped_at"] == 3.0
    one, one_out = run("one", **{"train.max_steps": 1})
    got, want = load_file(out / "model.safetensors"), load_file(one_out / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # step 1's weights
    assert not (out / "best").exists()  # the best-step files go once the model is saved


def test_an_unknown_signal_names_the_nearest_metric(tmp_path, policy_dir, prompts_file):  # noqa: F811
    cfg = _cfg(tmp_path, policy_dir, prompts_file, **{"rl.early_stop": {**STOP, "metric": "train/rewrd"}})
    with pytest.raises(UserError, match="did you mean 'train/reward'"):
        run_stage("grpo", cfg)
