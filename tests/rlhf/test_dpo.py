"""DPO: the loss worked by hand, the sequence log-probs of a (2B) pair batch, and the stage — smoke runs (full and LoRA),
precomputed reference = on the fly, ties / margins / the collection app's export, resume after SIGKILL."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import ModelSettings, load_config, parse_overrides
from rlhf.errors import UserError
from rlhf.losses import dpo_loss
from rlhf.pipeline import recipe, run_stage
from rlhf.policy import PolicyModel
from rlhf.recipes.dpo import pair_rollout, sequence_logps, tokenize_pairs
from rlhf.stage import read_manifest
from rlhf.tracking import read_metrics
from reward_models.data import PreferencePair

ROOT = Path(__file__).resolve().parents[2]
LOG2 = math.log(2.0)
SOFTPLUS_1 = math.log1p(math.exp(-1.0))  # −log σ(1) = log(1 + e^−1) = 0.3132617
SOFTPLUS_M1 = math.log1p(math.exp(1.0))  # −log σ(−1) = log(1 + e) = 1.3132617


# ---------------------------------------------------------------------------------------------------------------
# The loss, by hand. One pair: log π(y_c) = −1, log π(y_r) = −3, log π_ref(y_c) = log π_ref(y_r) = −2, β = 0.5.
# Log-ratios: chosen −1 − (−2) = +1, rejected −3 − (−2) = −1; gap h = 2; β·h = 1.


def _one(**kwargs):
    t = torch.tensor
    return dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), 0.5, **kwargs)


def test_sigmoid_is_bradley_terry_on_implicit_rewards():
    loss, m = _one()
    assert loss.item() == pytest.approx(SOFTPLUS_1, abs=1e-6)  # −log σ(1)
    # implicit rewards β·log-ratio: 0.5·1 and 0.5·(−1); accuracy 1; margin 0.5 − (−0.5) = 1
    assert (m["reward_chosen"].item(), m["reward_rejected"].item()) == pytest.approx((0.5, -0.5))
    assert m["accuracy"].item() == 1.0 and m["margin"].item() == pytest.approx(1.0)


def test_conservative_and_robust_label_smoothing():
    # cDPO, ε = 0.1: 0.9·(−log σ(1)) + 0.1·(−log σ(−1)) = 0.9·0.3132617 + 0.1·1.3132617 = 0.4132617
    assert _one(label_smoothing=0.1)[0].item() == pytest.approx(0.9 * SOFTPLUS_1 + 0.1 * SOFTPLUS_M1, abs=1e-6)
    assert _one(label_smoothing=0.1)[0].item() == pytest.approx(0.4132617, abs=1e-6)
    # rDPO, ε = 0.1: (0.9·0.3132617 − 0.1·1.3132617) / (1 − 0.2) = 0.1506100 / 0.8 = 0.1882625
    assert _one(loss_type="robust", label_smoothing=0.1)[0].item() == pytest.approx(0.1882625, abs=1e-6)
    # ε = 0 reduces both to DPO
    assert _one(loss_type="robust")[0].item() == pytest.approx(SOFTPLUS_1, abs=1e-6)


def test_ipo_squared_loss_with_and_without_length_normalization():
    # sums: (h − 1/(2β))² = (2 − 1)² = 1
    assert _one(loss_type="ipo")[0].item() == pytest.approx(1.0)
    # lengths 2 and 4: h̄ = 1/2 − (−1)/4 = 0.75, (0.75 − 1)² = 0.0625
    loss, _ = _one(loss_type="ipo", chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]))
    assert loss.item() == pytest.approx(0.0625)


def test_margin_is_an_offset_on_the_reward_gap():
    # ODPO: −log σ(β·h − m) with m = 1: −log σ(0) = log 2
    assert _one(margin=torch.tensor([1.0]))[0].item() == pytest.approx(LOG2)


def test_gradient_by_hand():
    # ∂ℓ/∂log π(y_c) = −β·σ(−β·h) = −0.5·σ(−1) = −0.5·0.2689414 = −0.1344707; the rejected gets the opposite
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.1344707, abs=1e-6) and pr.grad.item() == pytest.approx(0.1344707, abs=1e-6)


def test_global_normalizer_makes_micro_batches_add_up_to_the_batch():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6) for _ in range(4))
    full, _ = dpo_loss(pc, pr, rc, rr, 0.3)
    parts = [dpo_loss(pc[s], pr[s], rc[s], rr[s], 0.3, normalizer=6)[0] for s in (slice(0, 2), slice(2, 6))]
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-6)


def test_invalid_combinations_are_refused():
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        _one(loss_type="hinge")
    with pytest.raises(ValueError, match="no label_smoothing"):
        _one(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        _one(label_smoothing=0.5)


# ---------------------------------------------------------------------------------------------------------------
# Sequence log-probs of a pair batch


def test_pair_batch_logps_equal_each_sequence_scored_alone(nano_model_dir):
    policy = PolicyModel.load(ModelSettings(path=str(nano_model_dir)), device="cpu")
    pairs = [PreferencePair("<review> product: red phone", " the phone is nice .", " bad"),
             PreferencePair("a", " the case is okay . it works .", " it broke after a day .")]
    tokens, counts = tokenize_pairs(pairs, policy.tokenizer, max_length=64)
    assert counts["data/responses_cut"] == 0 and tokens[0].chosen[-1] == policy.tokenizer.eos_token_id
    with torch.no_grad():
        together, per_token = sequence_logps(policy, pair_rollout(tokens, policy.tokenizer.pad_token_id))
        assert together.shape == (4,) and per_token.shape[0] == 4
        for row, (pair, which) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
            t = tokens[pair]
            ids = torch.tensor([t.prompt + getattr(t, which)])
            logp = torch.log_softmax(policy.model(input_ids=ids).logits[0, :-1], -1)
            alone = logp.gather(-1, ids[0, 1:, None])[len(t.prompt) - 1:].sum()  # the response tokens only
            assert together[row].item() == pytest.approx(alone.item(), abs=1e-4)


def test_long_responses_are_cut_and_overlong_prompts_dropped(nano_model_dir, tokenizer):
    pairs = [PreferencePair("one two three four five six", " a b", " c"), PreferencePair("x", " a b c d e f g h", " c")]
    tokens, counts = tokenize_pairs(pairs, tokenizer, max_length=5)
    assert counts == {"data/overlong_prompts_dropped": 1.0, "data/responses_cut": 1.0}
    assert len(tokens) == 1 and len(tokens[0].prompt) + len(tokens[0].chosen) == 5


# ---------------------------------------------------------------------------------------------------------------
# The stage


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Review pairs of 6 prompts in the reward stage's format (some ties), plus 4 held-out gold prompts."""
    d = tmp_path_factory.mktemp("dpo-data")
    good = [" the phone is excellent .", " the screen is nice . i love it .", " it works perfectly ."]
    bad = [" the phone is terrible .", " it broke after a day .", " the case is poor ."]
    rows = []
    for i, product in enumerate(["red phone", "blue kettle", "green jacket", "navy lamp", "gray chair", "teal mug"]):
        for j in range(3):
            rows.append({"prompt": f"<review> product: {product}", "chosen": good[j], "rejected": bad[(j + i) % 3],
                         "tie": j == 2 and i % 2 == 0, "task": "review"})
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [json.loads(x) for x in (ROOT / "data/demo/eval_prompts.jsonl").read_text().splitlines()][:4]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return d


def _cfg(tmp_path, policy_dir, pairs_file, **overrides):
    base = {
        "output_dir": str(tmp_path / "out"), "model.path": str(policy_dir), "data.train": str(pairs_file / "pairs.jsonl"),
        "data.ties": "drop", "data.eval_fraction": 0.34, "train.max_steps": 3, "train.batch_size": 4,
        "train.log_every": 1, "optim.lr": 1e-2, "eval.gold_prompts": str(pairs_file / "eval.jsonl"),
        "eval.generation.max_new_tokens": 4, "tracking.mode": "disabled",
    }
    return load_config(recipe("dpo").Config, None, {**base, **overrides})


def _train_rows(out):
    return [r for r in read_metrics(out) if "perf/reference_seconds" in r]


def test_smoke_run_trains_every_parameter_and_logs_pairs_seen(tmp_path, policy_dir, pairs_file):
    result = run_stage("dpo", _cfg(tmp_path, policy_dir, pairs_file, **{"loss.sft_weight": 0.5, "train.grad_accum": 2}))
    out = tmp_path / "out"
    rows = _train_rows(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss/total"]) for r in rows)
    for key in ("loss/dpo", "loss/sft", "train/reward_chosen", "train/reward_rejected", "train/accuracy", "train/margin",
                "train/logps_chosen", "train/grad_norm", "perf/reference_seconds"):
        assert key in rows[-1], key
    # the policy starts as its reference: every implicit reward of the first step is exactly 0
    assert rows[0]["train/reward_chosen"] == 0.0 and rows[0]["train/margin"] == 0.0
    assert rows[0]["loss/dpo"] == pytest.approx(LOG2, abs=1e-6)
    assert [r["progress/samples"] for r in rows] == [8, 16, 24]  # pairs seen: batch 4 × 2 micro-batches per step
    metrics = result["metrics"]
    assert {"eval/accuracy", "eval/margin", "eval/loss", "eval/gold_score"} <= set(metrics)
    assert metrics["data/ties_dropped"] == 3 and read_manifest(out)["status"] == "complete"
    before, after = load_file(str(policy_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"


def test_lora_trains_adapters_against_the_base(tmp_path, policy_dir, pairs_file):
    result = run_stage("dpo", _cfg(tmp_path, policy_dir, pairs_file, **{"model.lora": {"r": 4, "alpha": 8}}))
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    rows = _train_rows(tmp_path / "out")
    assert rows[0]["train/margin"] == 0.0 and rows[-1]["train/margin"] != 0.0  # adapters off = the start, then it moves
    assert math.isfinite(result["metrics"]["loss/total"])


def test_precomputed_reference_trains_exactly_as_the_live_one(tmp_path, policy_dir, pairs_file, monkeypatch):
    live = run_stage("dpo", _cfg(tmp_path / "live", policy_dir, pairs_file))["metrics"]
    calls = []
    original = PolicyModel.reference
    monkeypatch.setattr(PolicyModel, "reference", lambda self: calls.append(1) or original(self))
    pre = run_stage("dpo", _cfg(tmp_path / "pre", policy_dir, pairs_file, precompute_ref=True))["metrics"]
    assert calls == [1], "the reference runs once, before training, and never in the loop or the evaluation"
    assert (tmp_path / "pre" / "out" / "ref_logps.pt").is_file()
    shared = {k for k in live if k.startswith(("loss/", "train/", "eval/accuracy", "eval/margin", "eval/loss"))}
    assert {k: pre[k] for k in shared} == pytest.approx({k: live[k] for k in shared}, rel=1e-4, abs=1e-6)


def test_ties_are_refused_by_default_with_the_file_and_the_option(tmp_path, policy_dir, pairs_file):
    with pytest.raises(UserError, match=r"pairs\.jsonl: 3 pair\(s\) are ties \(first: .*pairs\.jsonl:\d+\).*data\.ties=drop"):
        run_stage("dpo", _cfg(tmp_path, policy_dir, pairs_file, **{"data.ties": "error"}))


def test_margin_offset_is_only_for_the_sigmoid_loss(tmp_path, policy_dir, pairs_file):
    with pytest.raises(UserError, match="data.margins"):
        run_stage("dpo", _cfg(tmp_path, policy_dir, pairs_file, **{"data.margins": "offset", "loss.type": "ipo"}))


@pytest.mark.parametrize("loss", [{"loss.type": "ipo", "loss.beta": 0.5}, {"loss.type": "robust", "loss.label_smoothing": 0.1},
                                  {"loss.label_smoothing": 0.1}])
def test_every_loss_variant_runs(tmp_path, policy_dir, pairs_file, loss):
    result = run_stage("dpo", _cfg(tmp_path, policy_dir, pairs_file, **loss, **{"eval.gold_prompts": None}))
    assert math.isfinite(result["metrics"]["loss/total"]) and math.isfinite(result["metrics"]["eval/loss"])


def test_reads_the_collection_apps_export_with_margins(tmp_path, policy_dir, pairs_file):
    from rlhf.collect.export import write_dataset

    rows = [json.loads(x) for x in (pairs_file / "pairs.jsonl").read_text().splitlines()]
    export = [{**r, "margin": 0.5 + 0.1 * (i % 3), "pair_id": i, "n_judgments": 1, "meta": {"product": "x"}}
              for i, r in enumerate(rows)]
    write_dataset(export, tmp_path / "preferences")
    result = run_stage("dpo", _cfg(tmp_path, policy_dir, pairs_file, **{
        "data.train": str(tmp_path / "preferences"), "data.margins": "offset", "eval.gold_prompts": None}))
    assert result["metrics"]["data/pairs_with_margin"] > 0
    # with the margin as offset the first step is not log 2: −log σ(0 − m) averaged over the batch's margins
    assert _train_rows(tmp_path / "out")[0]["loss/dpo"] > LOG2


def test_sigkill_mid_stage_resumes_to_the_same_final_metrics(tmp_path, kill_and_resume, policy_dir, pairs_file):
    args = ["dpo", f"model.path={policy_dir}", f"data.train={pairs_file / 'pairs.jsonl'}", "data.ties=drop",
            "data.eval_fraction=0.34", "train.max_steps=12", "train.batch_size=4", "train.save_every=2",
            "train.log_every=1", "optim.lr=0.01", "precompute_ref=true", "eval.gold_prompts=null", "tracking.mode=disabled"]
    # the uninterrupted reference runs in this process (one interpreter start less): same config, same result
    run_stage("dpo", load_config(recipe("dpo").Config, None, parse_overrides([*args[1:], f"output_dir={tmp_path / 'ref'}"])))
    reference = read_manifest(tmp_path / "ref")["metrics"]

    out = tmp_path / "run"
    text = kill_and_resume(args, out)
    assert "resuming dpo from step-" in text and "reusing the precomputed reference log-probs" in text
    assert read_manifest(out)["metrics"] == pytest.approx(reference, rel=1e-5, abs=1e-6)
    steps = [r["step"] for r in read_metrics(out) if "perf/reference_seconds" in r]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("precompute", [False, True])
def test_bf16_reference_runs_like_the_policy_so_the_first_implicit_rewards_are_zero(tmp_path, policy_dir, pairs_file,
                                                                                    precompute):
    # policy = reference at the first step: β·log π/π_ref is 0 for every response when both run under bf16 autocast
    run_stage("dpo", _cfg(tmp_path, policy_dir, pairs_file, **{"train.precision": "bf16", "train.max_steps": 1,
                                                               "precompute_ref": precompute, "eval.gold_prompts": None}))
    row = _train_rows(tmp_path / "out")[0]
    assert row["train/reward_chosen"] == 0.0 and row["train/reward_rejected"] == 0.0
