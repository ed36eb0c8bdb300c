"""RL runs that must refuse rather than report nonsense as success, and RL inputs that must fail with one line.

Step shape (more minibatches than rows; the scheduler's length), the adaptive KL controller (β ≥ 0, horizons that
cannot work, a target with β = 0), a critic warm-up as long as the run, reward weights that overflow, bad params of
built-in rules, user rules that return the wrong thing or fail, a critic config that is not JSON, and the RLHF_*
sampling environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.pipeline import recipe, run_stage
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _config(kind: str, **overrides):
    return load_config(recipe(kind).Config, None, overrides)


@pytest.fixture(scope="module")
def add_prompts(tmp_path_factory) -> Path:
    """Eight addition prompts of the demo world."""
    rows = [json.loads(x) for x in (ROOT / "data/demo/rl_prompts.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("rl-prompts") / "add.jsonl"
    adds = [r for r in rows if r["task"] == "add"][:8]
    path.write_text("".join(json.dumps(r) + "\n" for r in adds))
    return path


def _tiny_run(kind: str, tmp_path: Path, policy_dir: Path, prompts: Path, **overrides):
    base = {"output_dir": str(tmp_path / "out"), "model.path": str(policy_dir), "data.prompts": str(prompts),
            "rewards": [{"name": "short", "rule": "length_penalty", "params": {"max_words": 1}}],
            "sampling.n": 2, "sampling.max_new_tokens": 4, "rl.prompts_per_step": 2, "rl.epochs": 1, "rl.minibatches": 1,
            "rl.micro_batch_size": 4,
            "train.max_steps": 1, "train.log_every": 1, "optim.lr": 1e-2, "reward.missing_eos_score": None,
            "eval.prompts": None, "samples_every": 0, "tracking.mode": "disabled"}
    return load_config(recipe(kind).Config, None, {**base, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# A1. More minibatches than rows; the scheduler counts the optimizer steps actually taken


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_more_minibatches_than_rows_is_refused_naming_the_keys_and_the_rows(kind):
    with pytest.raises(UserError, match=r"'rl.minibatches' \(100\) is more than the 16 rows of a step "
                                        r"\(rl.prompts_per_step × sampling.n = 4 × 4\)"):
        _config(kind, **{"rl.minibatches": 100, "rl.prompts_per_step": 4, "sampling.n": 4})
    assert _config(kind, **{"rl.minibatches": 16, "rl.prompts_per_step": 4, "sampling.n": 4}).rl.minibatches == 16


def test_update_plan_makes_exactly_the_configured_minibatches():
    from rlhf.config import RLSettings
    from rlhf.rollout import update_plan

    # torch.chunk(5) of 12 rows gives 4 parts of 3, chunk(4) of 6 rows 3 parts of 2: fewer updates than configured
    for rows, minibatches, sizes in [(12, 5, [3, 3, 2, 2, 2]), (6, 4, [2, 2, 1, 1]), (8, 2, [4, 4])]:
        rl = RLSettings(prompts_per_step=1, epochs=2, minibatches=minibatches, micro_batch_size=64)
        plan = update_plan(0, 3, rows, rl)
        for epoch in plan:
            assert [sum(len(m) for m in mb) for mb in epoch] == sizes
            assert sorted(torch.cat([m for mb in epoch for m in mb]).tolist()) == list(range(rows))


def test_the_scheduler_ends_exactly_when_the_optimizer_steps_do(tmp_path, policy_dir, add_prompts, monkeypatch):
    import rlhf.recipes.grpo as grpo

    steps = []
    real = grpo.optimizer_step
    monkeypatch.setattr(grpo, "optimizer_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    # 3 prompts × 2 = 6 rows in 4 minibatches (chunk made 3): a linear schedule ends at 10% of the peak lr
    cfg = _tiny_run("grpo", tmp_path, policy_dir, add_prompts, **{
        "rl.prompts_per_step": 3, "rl.minibatches": 4, "kl.beta": 0.0, "optim.schedule": "linear", "optim.lr": 1e-3})
    run_stage("grpo", cfg)
    assert len(steps) == 4
    last = [r for r in read_metrics(tmp_path / "out") if "train/lr" in r][-1]
    assert last["train/lr"] == pytest.approx(1e-4)


# ---------------------------------------------------------------------------------------------------------------
# A2. The adaptive KL controller: β ≥ 0, and a horizon that cannot work is refused


def test_adaptive_beta_never_goes_negative():
    from rlhf.advantages import AdaptiveKLController

    ctl = AdaptiveKLController(init_beta=0.04, target=2.0, horizon=1)
    for kl in (0.0, 5.0, 0.0, 0.0):  # KL below target with a tiny horizon: the factor 1 − 0.2·64/1 is negative
        ctl.update(kl, n_steps=64)
        assert ctl.value >= 0.0
    with pytest.raises(ValueError, match="horizon > 0"):
        AdaptiveKLController(init_beta=0.1, target=1.0, horizon=0)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_a_horizon_below_a_fifth_of_the_samples_per_step_is_refused(kind):
    rows = {"rl.prompts_per_step": 16, "sampling.n": 4, "kl.beta": 0.1, "kl.target": 2.0}
    with pytest.raises(UserError, match=r"'kl.horizon' \(1\) is too short for 64 samples per step.*above 12.8"):
        _config(kind, **rows, **{"kl.horizon": 1})
    with pytest.raises(UserError, match="kl.horizon"):
        _config(kind, **rows, **{"kl.horizon": 12})
    assert _config(kind, **rows, **{"kl.horizon": 13}).kl.horizon == 13
    assert _config(kind, **{**rows, "kl.horizon": 1, "kl.target": None}).kl.horizon == 1  # fixed β: no controller


def test_the_horizon_check_counts_every_process():
    from rlhf.recipes.rl_settings import check_step_shape

    cfg = _config("grpo", **{"rl.prompts_per_step": 4, "sampling.n": 4, "kl.target": 1.0, "kl.horizon": 4})
    check_step_shape(cfg.rl, cfg.sampling, cfg.kl)  # 16 samples: 4 > 3.2
    with pytest.raises(UserError, match="32 samples per step"):
        check_step_shape(cfg.rl, cfg.sampling, cfg.kl, processes=2)


# ---------------------------------------------------------------------------------------------------------------
# A3. A critic warm-up that covers the whole PPO run


def test_a_critic_warmup_as_long_as_the_run_is_refused():
    for warmup in (3, 5):
        with pytest.raises(UserError, match=r"'critic.warmup_steps' \(\d\) must be below train.max_steps \(3\).*"
                                            "save the input policy"):
            _config("ppo", **{"critic.warmup_steps": warmup, "train.max_steps": 3})
    assert _config("ppo", **{"critic.warmup_steps": 2, "train.max_steps": 3}).critic.warmup_steps == 2


def test_a_critic_warmup_keeps_the_policy_still_then_the_policy_trains(tmp_path, policy_dir, add_prompts, monkeypatch):
    import rlhf.recipes.ppo as ppo

    snapshots = []
    real = ppo.optimizer_step

    def recording(accelerator, modules, *args, **kwargs):
        norm = real(accelerator, modules, *args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in modules[0].state_dict().items()})
        return norm

    monkeypatch.setattr(ppo, "optimizer_step", recording)
    cfg = _tiny_run("ppo", tmp_path, policy_dir, add_prompts, **{
        "train.max_steps": 2, "critic.warmup_steps": 1, "critic.kind": "value_head", "kl.beta": 0.0, "kl.target": None})
    run_stage("ppo", cfg)
    before = load_file(str(policy_dir / "model.safetensors"))
    assert len(snapshots) == 2
    assert all(torch.equal(snapshots[0][k], v) for k, v in before.items()), "the policy moved during the warm-up"
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert any(not torch.equal(after[k], v) for k, v in before.items()), "the policy never trained after the warm-up"


# ---------------------------------------------------------------------------------------------------------------
# A4. kl.target with β = 0; reward weights that overflow float32


def test_a_kl_target_with_beta_zero_is_refused():
    for kind in ("grpo", "ppo"):
        with pytest.raises(UserError, match=r"'kl.target' \(2\) needs kl.beta > 0"):
            _config(kind, **{"kl.beta": 0.0, "kl.target": 2.0})


def test_a_weight_too_large_for_float32_is_refused_in_the_config():
    with pytest.raises(UserError, match=r"config key 'rewards.0.weight' must be at most 3.4e\+38"):
        _config("grpo", rewards=[{"name": "correct", "rule": "verifiable", "weight": 1e39}])


def test_a_weighted_total_that_overflows_names_the_reward(tmp_path, monkeypatch):
    from reward_models.scoring import RewardComponent, Scorer

    (tmp_path / "big_rewards.py").write_text("def huge(prompts, completions, metadata):\n"
                                             "    return [1e10 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    big = Scorer([RewardComponent(name="big", rule="big_rewards:huge", weight=1e30)])
    with pytest.raises(UserError, match=r"reward 'big': weight 1e\+30 × its scores \(up to 1e\+10\) overflows float32"):
        big.score(["p"], ["c"])
    # each term fits, their sum does not
    two = Scorer([RewardComponent(name=n, rule="missing_eos", weight=3e38) for n in ("a", "b")])
    with pytest.raises(UserError, match="weighted total overflows float32 once reward 'b' is added"):
        two.score(["p"], ["c"], ended=[False])


# ---------------------------------------------------------------------------------------------------------------
# D. Built-in rules given bad params, user rules that misbehave


@pytest.mark.parametrize("rule, params, expected", [
    ("format", {"pattern": "(unclosed"}, r"reward 'r': rule 'format': params.pattern '\(unclosed' is not a valid regular"),
    ("format", {"pattern": 5}, "params.pattern must be a regular expression string"),
    ("exact_match", {"pattern": "[a-"}, "params.pattern '\\[a-' is not a valid regular expression"),
    ("length_penalty", {"max_words": 0}, "params.max_words must be a whole number ≥ 1, got 0"),
    ("repetition_penalty", {"n": 0}, "params.n must be a whole number ≥ 1"),
    ("verifiable", {"tasks": ["mul"]}, r"params.tasks names unknown task\(s\) 'mul' \(known: add, review"),
    ("verifiable", {"nope": 1}, "bad params for rule 'verifiable'"),
])
def test_built_in_rules_with_bad_params_are_refused_at_config_time(rule, params, expected):
    with pytest.raises(UserError, match=expected) as info:
        _config("grpo", rewards=[{"name": "r", "rule": rule, "params": params}])
    assert "\n" not in str(info.value)


def test_verifiable_on_a_record_of_an_unknown_task_names_the_task():
    from reward_models.rules import BUILTIN_RULES, apply_rule

    with pytest.raises(UserError, match="rule 'verifiable': a prompt record has task 'mul', which has no gold scorer"):
        apply_rule("correct", BUILTIN_RULES["verifiable"], ["p"], ["c"], [{"task": "mul"}], {})
    assert apply_rule("correct", BUILTIN_RULES["verifiable"], ["p"], ["c"], [{"task": "mul"}], {"tasks": ["add"]}) == [0.0]


@pytest.fixture
def user_rules(tmp_path, monkeypatch):
    (tmp_path / "odd_rules.py").write_text(
        "def none(prompts, completions, metadata):\n"
        "    return None\n"
        "def scalar(prompts, completions, metadata):\n"
        "    return 0.5\n"
        "def crash(prompts, completions, metadata):\n"
        "    return [1 / 0 for _ in completions]\n"
        "def typo(prompts, completions, metadata):\n"
        "    return [len(c) + 'x' for c in completions]\n"
    )
    (tmp_path / "bad_syntax.py").write_text("def f(prompts, completions, metadata)\n    return []\n")
    (tmp_path / "bad_import.py").write_text("import os\nraise RuntimeError('no config here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("odd_rules", "bad_syntax", "bad_import"):
        sys.modules.pop(name, None)
    return tmp_path


@pytest.mark.parametrize("fn, expected", [
    ("none", r"reward 'mine': its rule odd_rules:none must return a list of one number per completion, got NoneType"),
    ("scalar", r"reward 'mine': its rule odd_rules:scalar must return a list .* got float 0.5"),
    ("crash", r"reward 'mine': its rule odd_rules:crash raised ZeroDivisionError: .*odd_rules.py:6\)"),
    ("typo", r"reward 'mine': its rule odd_rules:typo raised TypeError: .*odd_rules.py:8\)"),  # not "bad params"
])
def test_user_rules_that_return_the_wrong_thing_or_raise_name_the_reward(user_rules, fn, expected):
    from reward_models.scoring import RewardComponent, Scorer

    scorer = Scorer([RewardComponent(name="mine", rule=f"odd_rules:{fn}")])
    with pytest.raises(UserError, match=expected) as info:
        scorer.score(["p"], ["c"])
    assert "\n" not in str(info.value)
    if fn in ("crash", "typo"):  # --debug shows the user's own traceback
        assert info.value.__cause__ is not None


def test_user_rule_modules_that_do_not_import_name_the_rule_and_the_line(user_rules):
    from reward_models.rules import resolve_rule

    with pytest.raises(UserError, match=r"rule 'bad_syntax:f': .*bad_syntax.py:1: syntax error in module 'bad_syntax'"):
        resolve_rule("bad_syntax:f")
    with pytest.raises(UserError, match=r"rule 'bad_import:f': importing module 'bad_import' failed at "
                                        r".*bad_import.py:2 \(RuntimeError: no config here\)"):
        resolve_rule("bad_import:f")


def test_user_rule_params_are_checked_when_the_scorer_is_built(user_rules):
    from reward_models.scoring import RewardComponent, Scorer

    with pytest.raises(UserError, match="reward 'mine': bad params for rule 'odd_rules:none'"):
        Scorer([RewardComponent(name="mine", rule="odd_rules:none", params={"limit": 3})])


# ---------------------------------------------------------------------------------------------------------------
# D. A critic config.json that is not JSON


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", b"\xff\xfe"])
def test_a_critic_whose_config_is_not_json_is_a_one_line_error(tmp_path, content):
    from rlhf.config import ModelSettings
    from rlhf.critic import CriticSettings, _value_model

    critic = tmp_path / "critic"
    critic.mkdir()
    (critic / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=rf"critic from {critic}: .*config.json is not") as info:
        _value_model(CriticSettings(path=str(critic)), [], ModelSettings(path=str(critic)), tokenizer=None)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# D. RLHF_COMPILE_AFTER_S and RLHF_SAMPLING_BACKEND: validated, one rule for every caller


@pytest.fixture(scope="module")
def tiny_lm():
    from rlhf.policy import PolicyModel, load_tokenizer
    from rlhf.world import build_tiny_lm

    tok = load_tokenizer(str(ROOT / "data" / "demo" / "tokenizer"))
    model = build_tiny_lm(tok, "nano", seed=0)
    ids, mask = PolicyModel(None, tok).encode_prompts(["1+2=", "hello there"])
    kw = dict(max_new_tokens=3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, greedy=True)
    return model, ids, mask, kw


@pytest.mark.parametrize("name, value, expected", [
    ("RLHF_COMPILE_AFTER_S", "abc", "RLHF_COMPILE_AFTER_S='abc': expected a number of seconds ≥ 0"),
    ("RLHF_COMPILE_AFTER_S", "nan", "RLHF_COMPILE_AFTER_S='nan'"),
    ("RLHF_SAMPLING_BACKEND", "vllm", "RLHF_SAMPLING_BACKEND='vllm': expected one of hf, fast"),
    ("RLHF_COMPILE", "maybe", "RLHF_COMPILE='maybe'"),
])
def test_bad_sampling_environment_variables_are_one_line_errors(tiny_lm, monkeypatch, name, value, expected):
    from rlhf import generation

    model, ids, mask, kw = tiny_lm
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=expected):
        generation.generate(model, ids, mask, backend="fast", **kw)
    with pytest.raises(UserError, match=expected):
        generation.check_environment()


def test_the_sampling_backend_variable_applies_to_every_caller(tiny_lm, monkeypatch):
    from rlhf import generation

    model, ids, mask, kw = tiny_lm
    monkeypatch.setenv("RLHF_COMPILE", "0")
    assert generation.generate(model, ids, mask, backend="fast", **kw)[1].backend == "fast"
    monkeypatch.setenv("RLHF_SAMPLING_BACKEND", "hf")  # a config's `backend: fast` (RL, eval) yields to it too
    assert generation.generate(model, ids, mask, backend="fast", **kw)[1].backend == "hf"
    assert generation.generate(model, ids, mask, **kw)[1].backend == "hf"
    monkeypatch.setenv("RLHF_COMPILE_AFTER_S", "0.5")
    assert generation.compile_after_seconds() == 0.5
    assert "RLHF_SAMPLING_BACKEND=hf|fast" in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# The command line: exit 2, one line


def test_rl_cli_cases_exit_2_with_one_line(tmp_path, policy_dir, user_rules):
    common = [f"model.path={policy_dir}", "tracking.mode=disabled", "eval.prompts=null"]
    cases = [  # each a subprocess of a few seconds: the rest is covered in-process above
        (["grpo", "configs/grpo/demo.yaml", *common, "rl.minibatches=1000", f"output_dir={tmp_path / 'o1'}"], {},
         "'rl.minibatches' (1000) is more than the 256 rows of a step"),
        (["grpo", *common, 'rewards=[{name: s, rule: "bad_syntax:f"}]', f"output_dir={tmp_path / 'o2'}"], {},
         "syntax error in module 'bad_syntax'"),
        (["grpo", *common, f"output_dir={tmp_path / 'o3'}"], {"RLHF_COMPILE_AFTER_S": "abc"},
         "RLHF_COMPILE_AFTER_S='abc'"),
    ]
    for args, env, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(user_rules), **env},
                              timeout=180)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert err and expected in err[-1] and err[-1].startswith("error: ") and "Traceback" not in proc.stderr, (args, err)


@pytest.mark.parametrize("argv", [["sft", "train.max_steps=1"], ["eval", "models.x=nowhere"]])
def test_every_stage_checks_the_sampling_variables_before_loading(argv, monkeypatch, capsys):
    from rlhf.cli import main

    monkeypatch.setenv("RLHF_COMPILE_AFTER_S", "abc")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "RLHF_COMPILE_AFTER_S" in err and len(err.splitlines()) == 1, err
