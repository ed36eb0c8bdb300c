"""Export: aggregation by hand, and the dataset read unchanged by this project's reward stage and by TRL."""

import pytest

from rlhf.collect.export import export, preference_rows, vote
from rlhf.collect.settings import ExportSettings
from rlhf.collect.storage import NewPair, Store


def row(pair_id, choice, strength=None, annotator="p", gold=None, prompt="q", source_a="A", source_b="B"):
    return {"pair_id": pair_id, "choice": choice, "strength": strength, "annotator": annotator, "gold_label": gold,
            "prompt": prompt, "response_a": f"a{pair_id}", "response_b": f"b{pair_id}", "source_a": source_a,
            "source_b": source_b, "task": "add", "meta": {"k": 1}, "guidelines_version": "v1", "left": "a"}


def test_votes_and_aggregation_by_hand():
    assert vote("a", 3) == 1.0 and vote("b", None) == pytest.approx(-2 / 3) and vote("both_bad", 3) == 0.0
    rows = [
        # pair 1: A (strength 3) + B (strength 1) -> (1 - 1/3) / 2 = 1/3 -> A chosen, margin 1/3, agreement 1/2
        row(1, "a", 3, "p"), row(1, "b", 1, "q"),
        # pair 2: tie + both bad -> score 0 -> a tie
        row(2, "tie", None, "p"), row(2, "both_bad", None, "q"),
        # pair 3: B twice, no strength -> -2/3 -> B chosen
        row(3, "b", None, "p"), row(3, "b", None, "q"),
    ]
    kept = preference_rows(rows, ExportSettings(ties="keep"))
    one, two, three = kept
    assert (one["chosen"], one["rejected"], one["margin"], one["agreement"]) == ("a1", "b1", pytest.approx(1 / 3), 0.5)
    assert one["source_chosen"] == "A" and one["annotators"] == ["p", "q"]
    assert two["tie"] and two["margin"] == 0 and two["both_bad"] == 0.5 and two["agreement"] == 1.0
    assert (three["chosen"], three["rejected"], three["source_chosen"]) == ("b3", "a3", "B")
    assert three["meta"] == {"k": 1}
    dropped = preference_rows(rows, ExportSettings(ties="drop"))
    assert [r["pair_id"] for r in dropped] == [1, 3]
    assert preference_rows(rows, ExportSettings(min_judgments=3)) == []


def test_chat_prompts_export_as_conversations():
    chat = [{"role": "user", "content": "hi"}]
    out = preference_rows([row(1, "b", prompt=chat)], ExportSettings())
    assert out[0]["prompt"] == chat
    assert out[0]["chosen"] == [{"role": "assistant", "content": "b1"}]


def test_gold_excluded_on_request():
    rows = [row(1, "a", gold=1.0), row(2, "a")]
    assert [r["pair_id"] for r in preference_rows(rows, ExportSettings(include_gold=False))] == [2]


@pytest.fixture
def exported(tmp_path):
    """A small real export from a store: 12 judged pairs of demo-world text."""
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    store.add_pairs([NewPair(f"<add> {i}+1=", f" {i + 1}", f" {i + 2}", "good", "bad") for i in range(12)])
    from rlhf.collect.assign import Assigner
    from rlhf.collect.settings import AssignmentSettings

    who = store.find_annotator(store.add_annotator("p")).id
    assigner = Assigner(store, AssignmentSettings(overlap=1, gold_rate=0.0), seed=0)
    while (item := assigner.next_for(who)) is not None:
        side = "left" if item.left == f" {int(item.prompt.split()[1].split('+')[0]) + 1}" else "right"
        store.record_judgment(who, item.id, side, 2, "", "v1")
    summary = export(store, tmp_path / "prefs", ExportSettings())
    store.close()
    assert summary["rows"] == 12
    return tmp_path / "prefs"


def test_reward_stage_reads_export(exported):
    from datasets import load_from_disk

    from reward_models.data import load_preferences

    ds = load_from_disk(str(exported))
    assert {"prompt", "chosen", "rejected", "margin", "tie"} <= set(ds.column_names)
    pairs = load_preferences(str(exported))
    assert len(pairs) == 12
    assert all(p.chosen == f" {int(p.prompt.split()[1].split('+')[0]) + 1}" for p in pairs)  # the correct sums won
    assert all(p.margin == pytest.approx(2 / 3) and not p.tie for p in pairs)


def test_trl_reward_and_dpo_trainers_read_export(exported, tmp_path):
    import copy

    import torch
    from datasets import load_from_disk
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from rlhf.policy import load_tokenizer
    from tests.collect.conftest import REPO

    torch.manual_seed(0)
    tok = load_tokenizer(str(REPO / "data" / "demo" / "tokenizer"))
    size = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)
    ds = load_from_disk(str(exported))
    common = dict(max_steps=1, per_device_train_batch_size=4, report_to="none", use_cpu=True, save_strategy="no",
                  logging_steps=1)

    reward_model = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **size))
    rt = RewardTrainer(model=reward_model, args=RewardConfig(output_dir=str(tmp_path / "rm"), **common),
                       train_dataset=ds, processing_class=tok)
    assert torch.isfinite(torch.tensor(rt.train().training_loss))

    policy = LlamaForCausalLM(LlamaConfig(**size))
    dpo = DPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
                     train_dataset=ds, processing_class=tok)
    assert torch.isfinite(torch.tensor(dpo.train().training_loss))
