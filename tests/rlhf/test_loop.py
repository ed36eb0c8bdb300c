"""`rlhf loop`: rounds of collect on the current policy -> refresh the reward model -> RL, on nano models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rlhf.collect.storage import Store
from rlhf.errors import UserError
from rlhf.pipeline import run_stage
from rlhf.recipes import loop
from rlhf.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def loop_config(policy_dir: Path, out: Path, **top) -> dict:
    """Two rounds of 12 judgments (3 samples per prompt: 3 pairs a prompt, 4 prompts a round), 3 reward steps and
    2 GRPO steps each, on the review task."""
    return {
        "seed": 0, "output_dir": str(out), "policy": str(policy_dir), "rounds": 2, "judgments_per_round": 12,
        "tracking": {"mode": "disabled"},
        "collect": {"config": "configs/collect/pipeline.yaml", "overrides": {
            "pairs.samples_per_prompt": 3, "pairs.ready_ahead": 6, "pairs.generation.max_new_tokens": 12,
            "pairs.generation.prompts_per_batch": 2, "simulate.annotators": 1, "gold.world_margin": None,
        }},
        "reward": {"config": "configs/reward/demo.yaml", "heldout_fraction": 0.25, "overrides": {
            "train.max_steps": 3, "train.batch_size": 1, "train.log_every": 1, "optim.warmup_steps": 0,
            "loss.use_margin": False, "stats.num_samples": 4, "stats.max_new_tokens": 8, "model.max_length": 48,
        }},
        "rl": {"kind": "grpo", "config": "configs/grpo/demo.yaml", "steps_per_round": 2, "overrides": {
            "data.tasks": ["review"],
            "rewards": [{"name": "rm", "model": "reward", "normalize": True, "batch_size": 8}],
            "rl.prompts_per_step": 2, "sampling.n": 2, "sampling.max_new_tokens": 8,
            "eval.tasks": ["review"], "eval.limit": 4, "eval.rewards": [{"name": "gold", "rule": "verifiable"}],
            "eval.generation": {"max_new_tokens": 8, "batch_size": 8, "samples": 0},
            "train.save_every": 1, "train.eval_every": 1, "reward.missing_eos_score": None, "optim.lr": 1.0e-3,
        }},
        **top,
    }


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def finished_loop(tmp_path_factory, policy_dir):
    """One uninterrupted two-round loop, run in-process."""
    tmp = tmp_path_factory.mktemp("loop")
    out = tmp / "run"
    cfg = load_config(loop.Config, write_config(tmp, loop_config(policy_dir, out)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed-and-resumed subprocess runs, so sampling takes the same path
    try:
        result = run_stage("loop", cfg)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_rounds_collect_on_the_current_policy_and_refresh_the_reward_model(finished_loop, policy_dir):
    out, result = finished_loop
    rows = json.loads((out / "rounds.json").read_text())
    assert [row["round"] for row in rows] == [1, 2]
    assert [row["policy"] for row in rows] == [str(policy_dir), str(out / "round-1" / "rl")]
    assert "rm_fresh_accuracy" not in rows[0] and 0.0 <= rows[1]["rm_fresh_accuracy"] <= 1.0
    assert [row["judgments"] for row in rows] == [12.0, 24.0]
    # two gold evaluations per round (eval_every 1, 2 steps), on one RL step axis across rounds
    assert [step for row in rows for step, _, _ in row["gold_curve"]] == [1, 2, 3, 4]
    assert rows[1]["train_kl"] == rows[1]["gold_curve"][-1][2] > 0  # KL to the starting policy, not to round 1's
    assert result["metrics"]["eval/gold_score"] == rows[-1]["gold_curve"][-1][1]

    store = Store.open(f"sqlite:///{out / 'collect.db'}")
    try:
        judged = store.judgment_rows()
        assert len(judged) == 24 and [store.count_round_judgments(r) for r in (1, 2)] == [12, 12]
        # each round's pairs were sampled from the policy of that round, and every round is closed now
        sources = {(row["round"], row["source_a"]) for row in judged if row["gold_label"] is None}
        assert sources == {(1, str(policy_dir)), (2, str(out / "round-1" / "rl"))}
        assert store.current_round() is None
    finally:
        store.close()

    # round 2's reward model: warm-started from round 1's, trained on both rounds, held out on round 2 only
    reward_cfg = yaml.safe_load((out / "round-2" / "reward" / "config.yaml").read_text())
    assert reward_cfg["model"]["warm_start"] == str(out / "round-1" / "reward")
    train = [json.loads(line) for line in (out / "round-2" / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (out / "round-2" / "heldout.jsonl").read_text().splitlines()]
    assert {row["round"] for row in train} == {1, 2} and {row["round"] for row in heldout} == {2}
    assert not {json.dumps(r["prompt"]) for r in train if r["round"] == 2} & {json.dumps(r["prompt"]) for r in heldout}
    # the RL stages: round 2 starts from round 1's policy, KL to the starting policy in both
    rl_cfg = yaml.safe_load((out / "round-2" / "rl" / "config.yaml").read_text())
    assert rl_cfg["model"]["path"] == str(out / "round-1" / "rl")
    assert rl_cfg["model"]["ref_path"] == str(policy_dir)
    assert rl_cfg["rewards"][0]["model"] == str(out / "round-2" / "reward")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()  # the final policy, HF format


def test_a_closed_round_refuses_judgments_and_stops_serving_its_pairs(tmp_path):
    from rlhf.collect.assign import Assigner
    from rlhf.collect.settings import AssignmentSettings
    from rlhf.collect.storage import NewPair, RoundClosed

    store = Store.open(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        store.open_round(1, "policy-1")
        store.add_pairs([NewPair("<review> a", " x", " y", "policy-1", "policy-1", round=1),
                         NewPair("<review> b", " x", " y", "policy-1", "policy-1", round=1)])
        who = store.find_annotator(store.add_annotator("ann"))
        assigner = Assigner(store, AssignmentSettings(overlap=1, gold_rate=0.0), seed=0)
        first = assigner.next_for(who.id)
        store.open_round(2, "policy-2")  # closes round 1
        assert store.current_round() == (2, "policy-2")
        with pytest.raises(RoundClosed, match="round 1 has closed"):
            store.record_judgment(who.id, first.id, "left", None, "", "v1", overlap=1, lease_seconds=60)
        assert assigner.next_for(who.id) is None  # round 1's other pair is no longer served
        store.add_pairs([NewPair("<review> c", " x", " y", "policy-2", "policy-2", round=2)])
        assert store.get_pair(assigner.next_for(who.id).pair_id)["source_a"] == "policy-2"
        with pytest.raises(UserError, match="closed round is never reopened"):
            store.open_round(1, "policy-1")
        # a judgment belongs to the round it was made in
        second = assigner.next_for(who.id)
        store.record_judgment(who.id, second.id, "left", None, "", "v1", overlap=1, lease_seconds=60)
        assert (store.count_round_judgments(1), store.count_round_judgments(2)) == (0, 1)
        # a fresh attempt at round 2 removes its pairs, judgments and the round itself; round 1 stays
        assert store.drop_rounds_from(2) == 1
        assert store.current_round() is None and store.round_closed(1) and store.count_judgments() == 0
        assert {p["round"] for p in map(store.get_pair, (1, 2))} == {1}
    finally:
        store.close()


def test_bad_round_settings_exit_with_one_line(tmp_path, policy_dir):
    small = loop_config(policy_dir, tmp_path / "small", judgments_per_round=1)
    with pytest.raises(UserError, match="judgments_per_round 1 is smaller than one round can use"):
        run_stage("loop", load_config(loop.Config, write_config(tmp_path, small)))


def test_a_reward_model_is_not_warm_started_across_architectures(tmp_path, policy_dir):
    from transformers import BertConfig, BertForSequenceClassification

    from reward_models.model import RewardModel

    rm = RewardModel.from_backbone(str(policy_dir), max_length=32)
    encoder_rm = tmp_path / "encoder-rm"
    BertForSequenceClassification(BertConfig(vocab_size=rm.tokenizer.vocab_size + 8, hidden_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                             num_labels=1)).save_pretrained(encoder_rm)
    rm.tokenizer.save_pretrained(encoder_rm)
    with pytest.raises(UserError, match="another architecture than model.path"):
        rm.warm_start(str(encoder_rm))


def test_a_killed_loop_resumes_to_the_uninterrupted_numbers(tmp_path, finished_loop, policy_dir):
    """SIGKILL in round 2's collection (judgments acknowledged, pairs half judged), then the same command again."""
    reference_out, _ = finished_loop
    out = tmp_path / "run"
    config = write_config(tmp_path, loop_config(policy_dir, out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rlhf.cli", "loop", str(config)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    db = out / "collect.db"
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "round-2" / "collect").is_dir() and _judgments(db) > 14:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the loop ended before round 2's collection: " + proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _judgments(db)
    assert 14 < killed_at < 24
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[loop/round-1/rl] complete with an unchanged config: skipped" in resumed.stdout
    assert _judgments(db) == 24  # every acknowledged judgment kept, none made twice
    got = json.loads((out / "rounds.json").read_text())
    want = json.loads((reference_out / "rounds.json").read_text())
    for a, b in zip(got, want):
        for key in ("rm_fresh_accuracy", "rm_heldout_accuracy", "eval_gold_score", "train_kl", "round_pairs"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def _judgments(db: Path) -> int:
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM judgments").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_people_judge_through_a_server_that_follows_the_rounds(tmp_path, policy_dir):
    """annotators: people. One `rlhf collect serve`-style server (pairs.follow_rounds) runs for the whole loop; the
    loop opens each round and waits for its judgments, made here over HTTP by simulated people."""
    import threading

    from rlhf.collect.pairs import build_feeder
    from rlhf.collect.server import create_app
    from rlhf.collect.serving import ServerThread
    from rlhf.collect.settings import CollectConfig
    from rlhf.collect.simulate import prompt_lookup, run_simulation

    out = tmp_path / "run"
    data = loop_config(policy_dir, out, annotators="people", people={"wait_minutes": 5, "poll_seconds": 0.1},
                       database=f"sqlite:///{tmp_path / 'people.db'}")
    cfg = load_config(loop.Config, write_config(tmp_path, data))
    serve = load_config(CollectConfig, "configs/collect/pipeline.yaml", {
        **data["collect"]["overrides"], "pairs.policy": None, "pairs.follow_rounds": True, "database": cfg.database,
        "output_dir": str(tmp_path / "serve")})
    store = Store.open(serve.database_url())
    tokens = [store.add_annotator("person-1")]
    feeder = build_feeder(serve, store)
    feeder.poll_s = 0.1
    settings = serve.simulate.model_copy(update={"timeout_s": 300})

    def judge_until_the_server_stops(url):
        try:
            run_simulation(url, tokens, prompt_lookup(serve), settings, remaining=10_000)
        except RuntimeError:  # the server went away: the loop has finished
            pass

    with ServerThread(create_app(serve, store, feeder=feeder)) as url:
        people = threading.Thread(target=judge_until_the_server_stops, args=(url,), daemon=True)
        people.start()
        result = run_stage("loop", cfg)
    people.join(60)
    # each round waited for its 12 judgments (people may add a few before the loop sees the count and closes it)
    assert all(store.count_round_judgments(r) >= 12 for r in (1, 2))
    sources = {(row["round"], row["source_a"]) for row in store.judgment_rows()}
    assert sources == {(1, str(policy_dir)), (2, str(out / "round-1" / "rl"))}
    assert store.current_round() is None and "eval/gold_score" in result["metrics"]
    store.close()


def test_iterative_dpo_rounds_train_on_each_rounds_new_pairs(tmp_path, policy_dir):
    data = loop_config(policy_dir, tmp_path / "dpo")
    data["rl"] = {"kind": "dpo", "config": "configs/dpo/demo.yaml", "steps_per_round": 2, "overrides": {
        "model.lora": None, "train.batch_size": 4, "train.save_every": 1, "data.eval_fraction": 0.25,
        "eval.gold_limit": 4, "eval.generation.max_new_tokens": 8, "eval.pairs_limit": 8}}
    result = run_stage("loop", load_config(loop.Config, write_config(tmp_path, data)))
    out = tmp_path / "dpo"
    rl_cfg = yaml.safe_load((out / "round-2" / "rl" / "config.yaml").read_text())
    assert rl_cfg["data"]["train"] == str(out / "round-2" / "fresh.jsonl")
    assert rl_cfg["model"]["path"] == str(out / "round-1" / "rl") and rl_cfg["model"]["ref_path"] == str(policy_dir)
    assert "eval/gold_score" in result["metrics"] and (out / "round-2" / "reward" / "config.json").is_file()


def test_a_lora_policy_is_refused_in_a_loop(tmp_path, policy_dir):
    data = loop_config(policy_dir, tmp_path / "lora")
    data["rl"]["overrides"]["model.lora"] = {"r": 4, "alpha": 8}
    with pytest.raises(UserError, match="model.lora is not supported in a loop"):
        run_stage("loop", load_config(loop.Config, write_config(tmp_path, data)))
