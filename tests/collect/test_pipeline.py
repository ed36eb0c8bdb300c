"""Pairs from real (tiny) policy checkpoints, the simulated annotators over HTTP, the `collect` stage end to end
(collect -> export -> the reward stage's reader), and the `rlhf collect` commands."""

import json

import pytest

from rlhf.collect import cli, stage
from rlhf.collect.pairs import FilePairSource, PairFeeder, PolicyPairSource, build_source
from rlhf.collect.settings import GenerationSettings
from rlhf.collect.storage import Store
from rlhf.config import validate
from rlhf.errors import UserError
from rlhf.stage import StageContext

from .conftest import REPO, make_config, write_pairs

PROMPTS = str(REPO / "data" / "demo" / "eval_prompts.jsonl")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two untrained nano demo-world policies saved like the SFT stage saves its model."""
    from rlhf.policy import PolicyModel, load_tokenizer
    from rlhf.world import build_tiny_lm

    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1):
        tok = load_tokenizer(str(REPO / "data" / "demo" / "tokenizer"))
        PolicyModel(build_tiny_lm(tok, "nano", seed=seed), tok).save(root / f"policy{seed}")
        paths.append(str(root / f"policy{seed}"))
    return paths


class RecordingTracker:
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def summary(self, metrics):
        pass


def test_policy_source_two_samples_and_head_to_head(tmp_path, checkpoints):
    cfg = make_config(tmp_path, pairs={"policy": checkpoints[0], "prompts": PROMPTS, "max_prompts": 6,
                                       "generation": {"max_new_tokens": 8, "prompts_per_batch": 3}})
    source = build_source(cfg)
    batch = source.next_batch()
    assert 1 <= len(batch) <= 3 and all(p.response_a != p.response_b for p in batch)
    assert all(p.source_a == p.source_b == checkpoints[0] and p.task and p.meta for p in batch)
    assert source.next_batch()[0].prompt != batch[0].prompt  # the cursor moves through the prompt set

    cfg2 = make_config(tmp_path, pairs={"policy": checkpoints[0], "opponent": checkpoints[1], "prompts": PROMPTS,
                                        "generation": {"max_new_tokens": 8, "prompts_per_batch": 4}})
    h2h = build_source(cfg2).next_batch()
    assert h2h and all((p.source_a, p.source_b) == tuple(checkpoints) for p in h2h)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    cfg = make_config(tmp_path, pairs={"policy": str(tmp_path / "nope"), "prompts": PROMPTS})
    with pytest.raises(UserError, match="checkpoint not found"):
        build_source(cfg)


def test_config_requires_one_pair_source(tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        validate(type(make_config(tmp_path)), {"pairs": {}}, "x")


def test_feeder_keeps_pairs_ready_ahead(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    feeder = PairFeeder(store, FilePairSource(write_pairs(tmp_path / "p.jsonl", 30), batch_size=4),
                        ready_ahead=6, overlap=1, lease_seconds=60)
    while feeder.fill_once() > 0:
        pass
    assert store.pair_counts()["pairs"] == 8  # two batches of 4 reach ready_ahead = 6, then it waits
    assert feeder.fill_once() == 0


def test_collect_stage_end_to_end(tmp_path, checkpoints):
    cfg = validate(stage.Config, {
        "output_dir": str(tmp_path / "collect"),
        "pairs": {"policy": checkpoints[0], "opponent": checkpoints[1], "prompts": PROMPTS, "ready_ahead": 8,
                  "generation": {"max_new_tokens": 8, "prompts_per_batch": 8}},
        "assignment": {"overlap": 2, "gold_rate": 0.2},
        "gold": {"world_margin": 0.3, "max_items": 4},
        "simulate": {"annotators": 3, "judgments": 40, "timeout_s": 120},
        "export": {"ties": "keep", "bootstrap": 20},
    }, "test")
    ctx = StageContext(name="collect", kind="collect", dir=tmp_path / "collect", tracker=RecordingTracker())
    ctx.dir.mkdir()
    metrics = stage.run(cfg, ctx)
    assert metrics["collect/judgments"] == 40
    assert 0 <= metrics["collect/left_win_rate"] <= 1
    stats = json.loads((ctx.dir / "stats.json").read_text())
    assert sum(a["judgments"] for a in stats["annotators"].values()) == 40
    assert len(stats["leaderboard"]) == 2 and (ctx.dir / "leaderboard.json").is_file()
    assert ctx.tracker.logged[-1][0] == 40

    from reward_models.data import load_preferences

    pairs = load_preferences(str(ctx.dir / "preferences"))
    assert 0 < len(pairs) <= 40
    assert all(p.extra["source_chosen"] in checkpoints for p in pairs if not p.extra["is_gold"])

    # Resuming with a higher target adds only the missing judgments.
    resumed = StageContext(name="collect", kind="collect", dir=ctx.dir, tracker=RecordingTracker(), resume=True)
    cfg.simulate.judgments = 50
    assert stage.run(cfg, resumed)["collect/judgments"] == 50


def test_cli_commands(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 10)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "output_dir": str(tmp_path / "out"),
        "pairs": {"file": str(pairs), "ready_ahead": 100},
        "assignment": {"overlap": 2, "gold_rate": 0.0},
        "simulate": {"annotators": 3, "judgments": 20, "temperature": 0.1},
        "export": {"bootstrap": 20},
    }))
    assert cli.main(["add-annotator", "--config", str(config), "--name", "alice", "--admin"]) == 0
    token = capsys.readouterr().out.strip()
    assert len(token) >= 30
    with pytest.raises(UserError, match="already exists"):
        cli.main(["add-annotator", "--config", str(config), "--name", "alice"])

    assert cli.main(["simulate", "--config", str(config)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["judgments"] == 20 and stats["pairs_complete"] == 10
    # Simulated annotators with little noise pick the correct sums: the good checkpoint leads.
    assert cli.main(["leaderboard", "--config", str(config), "--out", str(tmp_path / "lb.json")]) == 0
    board = json.loads((tmp_path / "lb.json").read_text())
    assert board[0]["name"] == "ckpt-good" and board[0]["low"] > board[1]["high"]

    assert cli.main(["export", "--config", str(config), "--out", str(tmp_path / "prefs")]) == 0
    assert "exported" in capsys.readouterr().out
    from datasets import load_from_disk

    assert len(load_from_disk(str(tmp_path / "prefs"))) >= 8

    with pytest.raises(UserError, match="unknown config key"):
        cli.main(["stats", "--config", str(config), "server.prot=1"])


def test_generation_settings_reach_the_policy(tmp_path):
    calls = []

    class FakePolicy:
        tokenizer = None

        def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed):
            calls.append((len(prompts), n, max_new_tokens, temperature))

            class Out:
                completions = [f"r{i}" for i in range(len(prompts) * n)]

            return Out()

    prompts = [{"prompt": f"p{i}", "task": "add", "meta": {}} for i in range(5)]
    source = PolicyPairSource({"ckpt": FakePolicy()}, prompts, GenerationSettings(max_new_tokens=7, temperature=0.7,
                                                                                   prompts_per_batch=2))
    batch = source.next_batch()
    assert calls == [(2, 2, 7, 0.7)]
    assert [(p.response_a, p.response_b) for p in batch] == [("r0", "r1"), ("r2", "r3")]


class _ScriptedPolicy:
    """Returns `completions` for every generate call (the n samples of each prompt back to back)."""

    tokenizer = None

    def __init__(self, completions):
        self.completions = completions

    def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed):
        completions = self.completions

        class Out:
            pass

        out = Out()
        out.completions = completions[: len(prompts) * n]
        return out


def test_k_samples_per_prompt_give_every_pair_of_distinct_responses():
    prompts = [{"prompt": "p0", "task": "review", "meta": {}}, {"prompt": "p1", "task": "review", "meta": {}}]
    # p0: x, y, x (a duplicate), z -> 3 distinct responses, 3 pairs; p1: u, " " (blank), v, w -> pairs without " "
    policy = _ScriptedPolicy(["x", "y", "x", "z", "u", " ", "v", "w"])
    source = PolicyPairSource({"ckpt": policy}, prompts, GenerationSettings(prompts_per_batch=2), samples_per_prompt=4)
    batch = source.next_batch()
    assert [(p.prompt, p.response_a, p.response_b) for p in batch] == [
        ("p0", "x", "y"), ("p0", "x", "z"), ("p0", "y", "z"),
        ("p1", "u", "v"), ("p1", "u", "w"), ("p1", "v", "w"),
    ]
    assert all(p.task == "review" for p in batch)
    with pytest.raises(ValueError):
        PolicyPairSource({"ckpt": policy}, prompts, GenerationSettings(), samples_per_prompt=1)


def test_task_filter_and_samples_per_prompt_settings(tmp_path, checkpoints):
    rows = [{"prompt": f"add {i}", "task": "add", "meta": {}} for i in range(3)]
    rows += [{"prompt": f"review {i}", "task": "review", "meta": {}} for i in range(3)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(tmp_path, pairs={"policy": checkpoints[0], "prompts": str(prompts), "task": "review",
                                       "max_prompts": 2, "samples_per_prompt": 3})
    source = build_source(cfg)
    assert [r["prompt"] for r in source.prompts] == ["review 0", "review 1"]  # filtered first, then the first N
    assert source.samples_per_prompt == 3

    with pytest.raises(UserError, match="no prompt has task"):
        build_source(make_config(tmp_path, pairs={"policy": checkpoints[0], "prompts": str(prompts), "task": "chat"}))
    with pytest.raises(UserError, match="samples_per_prompt"):
        make_config(tmp_path, pairs={"policy": checkpoints[0], "opponent": checkpoints[1], "prompts": str(prompts),
                                     "samples_per_prompt": 4})
