"""Interop with TRL 1.16 and plain transformers: our preference files train TRL's RewardTrainer as they are, we read
the same token ids TRL does, and a TRL-trained reward model scores the same through our RewardModel."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from reward_models.model import RewardModel
from reward_models.pairs import example_pairs, write_jsonl


@pytest.fixture(scope="module")
def trl_trainer(decoder_dir, tmp_path_factory):
    """One TRL RewardTrainer step on a preference file written by the project (tie / task / meta columns and all)."""
    from datasets import load_dataset
    from trl import RewardConfig, RewardTrainer

    tmp = tmp_path_factory.mktemp("trl")
    rows = example_pairs(12, seed=1)
    for i, row in enumerate(rows):
        row["margin"] = 0.25 * i  # the optional margin column TRL reads too
    write_jsonl(rows, tmp / "pairs.jsonl")
    dataset = load_dataset("json", data_files=str(tmp / "pairs.jsonl"), split="train")
    args = RewardConfig(output_dir=str(tmp / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                        report_to="none", save_strategy="no", bf16=False, gradient_checkpointing=False,
                        use_cpu=True, logging_steps=1, dataloader_num_workers=0)
    trainer = RewardTrainer(model=str(decoder_dir), args=args, train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    trainer.save_model(str(tmp / "trl_rm"))
    return trainer, before, result, rows, tmp / "trl_rm"


def test_trl_reward_trainer_trains_on_our_preference_file(trl_trainer):
    trainer, before, result, _, _ = trl_trainer
    assert result.global_step == 1 and math.isfinite(result.training_loss)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("score" in n for n in changed) and any("layers" in n for n in changed)


def test_we_tokenize_pairs_exactly_as_trl(trl_trainer):
    trainer, _, _, rows, _ = trl_trainer
    rm = RewardModel(trainer.model, trainer.processing_class, "decoder")
    for i in range(3):
        ours_chosen, ours_rejected = rm.encode([rows[i]["prompt"]] * 2, [rows[i]["chosen"], rows[i]["rejected"]])
        assert ours_chosen.input_ids == trainer.train_dataset[i]["chosen_ids"]
        assert ours_rejected.input_ids == trainer.train_dataset[i]["rejected_ids"]


def test_trl_trained_model_scores_the_same_through_our_reward_model(trl_trainer):
    _, _, _, rows, path = trl_trainer
    ours = RewardModel.load(str(path))
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = ours.tokenizer
    enc = tok([p + c + tok.eos_token for p, c in zip(prompts, completions)], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = plain(**enc).logits.squeeze(-1)
    torch.testing.assert_close(ours.score(prompts, completions), expected, rtol=1e-5, atol=1e-5)
