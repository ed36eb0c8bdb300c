"""Planning a comparison (nothing runs): the budget rule, sweeps, unknown keys and unregistered stage kinds, and the
W&B report spec built offline."""

from types import SimpleNamespace

import pytest

from .conftest import comparison_config, write_config
from rlhf.compare.config import load_compare
from rlhf.compare.runner import plan, samples_per_step
from rlhf.errors import UserError


def _plan(tmp_path, inputs, **changes):
    path = write_config(tmp_path / "c.yaml", comparison_config(inputs, tmp_path / "out", **changes))
    return plan(load_compare(path), processes=1)


def test_budget_in_samples_gives_every_run_the_same_samples(tmp_path, compare_inputs):
    runs = _plan(tmp_path, compare_inputs)
    assert [(r.algorithm, r.seed) for r in runs] == [("grpo", 0), ("rloo", 0), ("grpo", 1), ("rloo", 1)]  # seed-major
    steps = {r.algorithm: (r.samples_per_step, r.max_steps, r.eval_every) for r in runs}
    assert steps == {"grpo": (8, 4, 2), "rloo": (16, 2, 1)}  # 2 × 4 and 4 × 4 samples a step; eval every 16 samples
    for r in runs:
        assert r.samples_per_step * r.max_steps == 32
        assert r.cfg.train.max_steps == r.max_steps and r.cfg.train.eval_every == r.eval_every
        assert r.cfg.model.path == str(compare_inputs / "policy") and r.cfg.seed == r.seed
        assert r.dir.endswith(f"out/{r.algorithm}/seed-{r.seed}")
        tracking = r.cfg.tracking
        assert (tracking.group, tracking.job_type, tracking.run_name) == ("tiny", r.algorithm, f"tiny/{r.algorithm}-seed{r.seed}")
        assert tracking.run_config["budget"] == {"samples": 32}
        assert {k: tracking.run_config[k] for k in ("algorithm", "seed", "beta")} == {
            "algorithm": r.algorithm, "seed": r.seed, "beta": r.cfg.kl.beta}
        assert r.cfg.rewards[1].name == "short" and r.cfg.eval.rewards[0].name == "gold"  # the shared settings


def test_a_budget_that_does_not_divide_is_an_error(tmp_path, compare_inputs):
    with pytest.raises(UserError, match=r"algorithm 'rloo': budget.samples=40 is not a multiple of its 16 samples per step.*32 or 48"):
        _plan(tmp_path, compare_inputs, budget={"samples": 40})


def test_token_budget_is_a_cap_with_the_longest_responses(tmp_path, compare_inputs):
    runs = _plan(tmp_path, compare_inputs, budget={"tokens": 480})
    # at most 6 tokens a sample: grpo 8 × 6 = 48 tokens a step -> 10 steps, rloo 16 × 6 = 96 -> 5
    assert {r.algorithm: r.max_steps for r in runs} == {"grpo": 10, "rloo": 5}
    assert all(r.samples_per_step * r.max_steps * 6 <= 480 for r in runs)


def test_offline_pairs_count_as_samples():
    # DPO: one sample = one preference pair; pairs per step = batch_size × grad_accum × processes
    cfg = SimpleNamespace(train=SimpleNamespace(batch_size=8, grad_accum=2))
    assert samples_per_step("dpo", cfg, processes=2) == 32


def test_sweep_makes_one_arm_per_value(tmp_path, compare_inputs):
    algorithms = comparison_config(compare_inputs, tmp_path)["algorithms"]
    algorithms["grpo"]["sweep"] = {"kl.beta": [0.01, 0.1]}
    runs = _plan(tmp_path, compare_inputs, algorithms=algorithms, seeds=[0])
    assert [r.arm for r in runs] == ["grpo beta=0.01", "grpo beta=0.1", "rloo"]
    assert [r.cfg.kl.beta for r in runs] == [0.01, 0.1, 0.04]
    assert runs[0].dir.endswith("out/grpo/beta-0.01/seed-0") and runs[0].name == "grpo-beta0.01-seed0"
    assert runs[1].cfg.tracking.run_config["beta"] == 0.1 and runs[1].cfg.tracking.run_config["arm"] == "grpo beta=0.1"


def test_unregistered_stage_kind_is_an_error_naming_the_algorithm(tmp_path, compare_inputs, monkeypatch):
    from rlhf import pipeline

    algorithms = comparison_config(compare_inputs, tmp_path)["algorithms"]
    monkeypatch.delitem(pipeline.STAGES, "dpo", raising=False)
    with pytest.raises(UserError, match="algorithm 'dpo-beta': stage kind 'dpo' is not registered"):
        _plan(tmp_path, compare_inputs, algorithms={**algorithms, "dpo-beta": {"kind": "dpo"}})
    monkeypatch.setitem(pipeline.STAGES, "dpo", "rlhf.recipes.no_such_recipe")  # registered, module not there yet
    with pytest.raises(UserError, match="algorithm 'dpo-beta': stage kind 'dpo' is registered but its recipe"):
        _plan(tmp_path, compare_inputs, algorithms={**algorithms, "dpo-beta": {"kind": "dpo"}})


def test_unknown_keys_are_errors_with_a_hint(tmp_path, compare_inputs):
    shared = {**comparison_config(compare_inputs, tmp_path)["shared"], "kl.betta": 0.1}
    with pytest.raises(UserError, match="shared key 'kl.betta'.*did you mean 'kl.beta'"):
        _plan(tmp_path, compare_inputs, shared=shared)
    algorithms = comparison_config(compare_inputs, tmp_path)["algorithms"]
    algorithms["rloo"]["overrides"]["loss.advantag"] = "rloo"
    with pytest.raises(UserError, match="algorithm 'rloo': 'loss.advantag'.*did you mean 'loss.advantage'"):
        _plan(tmp_path, compare_inputs, algorithms=algorithms)
    with pytest.raises(UserError, match="budget"):
        _plan(tmp_path, compare_inputs, budget={"samples": 32, "tokens": 100})


def test_wandb_report_spec_is_built_offline(tmp_path, compare_inputs, monkeypatch):
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    import wandb

    from rlhf.compare.dashboard import PANELS, build_report, report_spec

    def no_network(*args, **kwargs):
        raise AssertionError("building the report spec must not call the W&B API")

    monkeypatch.setattr(wandb, "Api", no_network)
    cfg = load_compare(write_config(tmp_path / "c.yaml", comparison_config(compare_inputs, tmp_path / "out")))
    spec = report_spec(cfg)
    assert (spec["project"], spec["group"], spec["runset"]["filters"]) == ("rlhf-test", "tiny", "Group = 'tiny'")
    lines = [p for p in spec["panels"] if p["type"] == "line"]
    assert {p["x"] for p in lines} == {"progress/samples"}
    assert {"eval/gold_score", "eval/rm_score", "train/reward", "train/kl", "train/entropy", "train/response_length",
            "perf/tokens_per_s", "perf/peak_rss_gb"} <= {y for p in lines for y in p["y"]}
    assert {"x": "eval/rm_score", "y": "eval/gold_score"}.items() <= next(p for p in spec["panels"] if p["type"] == "scatter").items()
    report = build_report(spec)
    (grid,) = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grid.panels) == len(PANELS)
    assert grid.runsets[0].groupby == ["config.arm"]
    assert isinstance(grid.panels[0], wr.LinePlot) and grid.panels[0].x == "progress/samples"


def test_dpo_budget_counts_preference_pairs(tmp_path, compare_inputs):
    from rlhf import pipeline

    if "dpo" not in pipeline.STAGES:
        pytest.skip("the dpo stage is not registered yet")
    algorithms = comparison_config(compare_inputs, tmp_path)["algorithms"]
    algorithms["dpo"] = {"kind": "dpo", "overrides": {"train.batch_size": 8, "train.grad_accum": 2, "loss.beta": 0.2}}
    runs = _plan(tmp_path, compare_inputs, algorithms=algorithms, seeds=[0])
    dpo = runs[-1]
    assert (dpo.samples_per_step, dpo.max_steps, dpo.beta, dpo.kl_target) == (16, 2, 0.2, None)  # 32 pairs
    assert dpo.cfg.model.path == str(compare_inputs / "policy") and dpo.cfg.tracking.job_type == "dpo"


def test_the_demo_comparison_plans_equal_budgets():
    from pathlib import Path

    from rlhf.compare.runner import fairness_differences

    root = Path(__file__).resolve().parents[2]
    path = root / "configs/compare/demo.yaml"
    assert "2 CPU cores" in path.read_text().split("\n\n")[0]  # the header says what it runs and how long
    runs = plan(load_compare(str(path)), processes=1)
    assert sorted({r.algorithm for r in runs}) == ["grpo", "ppo", "rloo"] and sorted({r.seed for r in runs}) == [0, 1, 2]
    assert {(r.samples_per_step * r.max_steps, r.eval_every * r.samples_per_step) for r in runs} == {(1536, 256)}
    assert fairness_differences(runs) == {}  # same base, prompts, reward, held-out set, gold scorer and KL target
    assert {r.cfg.kl.target for r in runs} == {2.0}


@pytest.mark.parametrize("name", ["async", "smollm2", "ensemble"])
def test_every_shipped_comparison_plans(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / f"configs/compare/{name}.yaml"
    assert "2 CPU cores" in path.read_text().split("\n\n")[0]
    runs = plan(load_compare(str(path)), processes=1)
    assert len({r.samples_per_step * r.max_steps for r in runs}) == 1  # one budget for all


def test_the_ensemble_comparison_differs_only_in_the_reward():
    from pathlib import Path

    from rlhf.compare.runner import fairness_differences

    path = Path(__file__).resolve().parents[2] / "configs/compare/ensemble.yaml"
    runs = plan(load_compare(str(path)), processes=1)
    assert {r.cfg.rewards[0].aggregate for r in runs} == {"mean", "mean_minus_std"}
    assert set(fairness_differences(runs)) == {"rewards"}
