"""Reward-model ensembles: k members trained by one reward stage, scored together (mean, mean − λ·std, min) with
their disagreement logged."""

import json

import pytest
import torch
import yaml

from rlhf.errors import UserError
from rlhf.pipeline import run_stage
from reward_models.model import RewardModel
from reward_models.scoring import RewardComponent, Scorer, aggregate_ensemble, ensemble_members

from .test_train import toy_config


def test_aggregates_by_hand():
    scores = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])  # 3 members, 2 responses
    assert aggregate_ensemble(scores, "mean").tolist() == pytest.approx([2.0, 1.0])
    # std over members with Bessel's correction: [1, √3]
    assert aggregate_ensemble(scores, "mean_minus_std", 0.5).tolist() == pytest.approx([1.5, 1.0 - 0.5 * 3 ** 0.5])
    assert aggregate_ensemble(scores, "min").tolist() == [1.0, 0.0]
    assert aggregate_ensemble(scores[:1], "min").tolist() == [1.0, 0.0]  # one member: its scores


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, nano_model_dir):
    import random

    tmp = tmp_path_factory.mktemp("ensemble")
    rng = random.Random(0)
    rows = [{"prompt": f"<review> product: {t}", "chosen": f" the {t} is great .", "rejected": f" the {t} is poor ."}
            for t in (rng.choice(["kettle", "lamp", "chair", "mug", "desk", "tent"]) for _ in range(48))]
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = toy_config(nano_model_dir, data, tmp / "rm", ensemble={"members": 3}, train__max_steps=4)
    result = run_stage("reward", cfg)
    return tmp / "rm", result


def test_one_stage_trains_every_member_on_the_same_split(ensemble_dir):
    out, result = ensemble_dir
    members = ensemble_members(str(out))
    assert members == [str(out / "members" / f"member-{i}") for i in (1, 2)]
    configs = [yaml.safe_load((out / "members" / f"member-{i}" / "config.yaml").read_text()) for i in (1, 2)]
    assert [c["seed"] for c in configs] == [1, 2] and {c["data"]["split_seed"] for c in configs} == {0}
    weights = [RewardModel.load(p).hf.score.weight for p in [str(out), *members]]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])  # other seeds
    m = result["metrics"]
    assert m["eval/ensemble_members"] == 3.0 and 0.0 <= m["eval/ensemble_accuracy"] <= 1.0
    assert m["eval/ensemble_disagreement"] > 0.0


def test_the_scorer_scores_an_ensemble_conservatively_and_logs_its_disagreement(ensemble_dir):
    out, _ = ensemble_dir
    prompts = ["<review> product: lamp", "<review> product: tent"]
    completions = [" the lamp is great .", " the tent is poor ."]
    single = [RewardModel.load(p) for p in [str(out), *ensemble_members(str(out))]]
    each = torch.stack([m.normalize(m.score(prompts, completions)) for m in single])
    for how in ("mean", "mean_minus_std", "min"):
        scores = Scorer([RewardComponent(name="rm", model=str(out), aggregate=how, uncertainty_penalty=2.0)])
        got = scores.score(prompts, completions)
        assert got.total.tolist() == pytest.approx(aggregate_ensemble(each, how, 2.0).tolist(), abs=1e-5)
        assert got.components["rm_disagreement"].tolist() == pytest.approx(each.std(0).tolist(), abs=1e-5)
        assert "reward/rm_disagreement" in got.metrics()


def test_a_conservative_aggregate_of_one_model_is_refused(ensemble_dir):
    out, _ = ensemble_dir
    with pytest.raises(UserError, match="needs a reward-model ensemble"):
        Scorer([RewardComponent(name="rm", model=str(out / "members" / "member-1"), aggregate="min")])
