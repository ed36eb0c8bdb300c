"""The scoring interface: weighted sum of learned and rule rewards, normalization, rollouts, config checks."""

import pytest
import torch
from pydantic import ValidationError

from rlhf.errors import UserError
from rlhf.types import Rollout
from reward_models.model import RewardModel
from reward_models.scoring import RewardComponent, Scorer

PROMPTS = ["<add> 47+38=", "<add> 47+38=", "<review> product: red kettle"]
COMPLETIONS = [" 85", " 84", " the kettle is great . the kettle is great ."]
METADATA = [
    {"task": "add", "meta": {"a": 47, "b": 38, "answer": 85, "format": "direct"}},
    {"task": "add", "meta": {"a": 47, "b": 38, "answer": 85, "format": "direct"}},
    {"task": "review", "meta": {"product": "kettle", "color": "red"}},
]


@pytest.fixture(scope="module")
def trained_rm_dir(decoder_dir, tmp_path_factory):
    rm = RewardModel.from_backbone(str(decoder_dir))
    torch.nn.init.normal_(rm.hf.score.weight)
    rm.set_stats(rm.score(PROMPTS * 3, COMPLETIONS[::-1] * 3), "test samples")
    path = tmp_path_factory.mktemp("rm")
    rm.save(path)
    return path


def test_rule_and_model_components_mix_in_one_weighted_sum(trained_rm_dir):
    components = [
        RewardComponent(name="rm", model=str(trained_rm_dir), weight=0.5),
        RewardComponent(name="correct", rule="verifiable", params={"tasks": ["add"]}, weight=2.0),
        RewardComponent(name="repeat", rule="repetition_penalty", params={"n": 2}, weight=1.0),
    ]
    scores = Scorer(components).score(PROMPTS, COMPLETIONS, METADATA)
    rm = RewardModel.load(str(trained_rm_dir))
    expected_rm = rm.normalize(rm.score(PROMPTS, COMPLETIONS))
    torch.testing.assert_close(scores.components["rm"], expected_rm)
    assert scores.components["correct"].tolist() == [1.0, 0.0, 0.0]
    assert scores.components["repeat"][2].item() < 0
    torch.testing.assert_close(
        scores.total, 0.5 * expected_rm + 2.0 * scores.components["correct"] + scores.components["repeat"])
    assert scores.total.shape == (3,) and scores.total.dtype == torch.float32
    metrics = scores.metrics()
    assert set(metrics) == {"reward/rm", "reward/correct", "reward/repeat"}
    assert metrics["reward/correct"] == pytest.approx(1 / 3)


def test_reward_models_are_frozen_and_in_eval_mode(trained_rm_dir):
    scorer = Scorer([RewardComponent(name="rm", model=str(trained_rm_dir), normalize=False)])
    rm = scorer.models["rm"]
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    raw = scorer.score(PROMPTS, COMPLETIONS).total
    torch.testing.assert_close(raw, RewardModel.load(str(trained_rm_dir)).score(PROMPTS, COMPLETIONS))


def test_score_rollout_expands_prompt_records_and_passes_ended():
    scorer = Scorer([RewardComponent(name="eos", rule="missing_eos"),
                     RewardComponent(name="gold", rule="verifiable", weight=10.0)])
    rollout = Rollout(
        prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool),
        response_ids=torch.zeros(4, 2, dtype=torch.long), response_mask=torch.ones(4, 2, dtype=torch.bool),
        ended=torch.tensor([True, False, True, True]), lengths=torch.full((4,), 2),
        prompt_index=torch.tensor([0, 0, 1, 1]),
        prompts=["<add> 1+2=", "<add> 1+2=", "<add> 2+2=", "<add> 2+2="],
        completions=[" 3", " 3", " 4", " 5"],
    )
    records = [{"prompt": "<add> 1+2=", "task": "add", "meta": {"a": 1, "b": 2, "answer": 3, "format": "direct"}},
               {"prompt": "<add> 2+2=", "task": "add", "meta": {"a": 2, "b": 2, "answer": 4, "format": "direct"}}]
    scores = scorer.score_rollout(rollout, records)
    assert scores.components["eos"].tolist() == [0.0, -1.0, 0.0, 0.0]
    assert scores.total.tolist() == [10.0, 9.0, 10.0, 0.0]
    assert "ended" not in records[0]  # the caller's records are not modified


def test_config_errors():
    with pytest.raises(ValidationError, match="exactly one of 'model' or 'rule'"):
        RewardComponent(name="x")
    with pytest.raises(ValidationError, match="exactly one of 'model' or 'rule'"):
        RewardComponent(name="x", model="a", rule="format")
    with pytest.raises(UserError, match="unique"):
        Scorer([RewardComponent(name="x", rule="format"), RewardComponent(name="x", rule="missing_eos")])
    with pytest.raises(UserError, match="no reward components"):
        Scorer([])


def test_normalize_requires_stored_stats(decoder_dir, tmp_path):
    RewardModel.from_backbone(str(decoder_dir)).save(tmp_path / "rm")
    with pytest.raises(UserError, match="no stored score statistics"):
        Scorer([RewardComponent(name="rm", model=str(tmp_path / "rm"))])
