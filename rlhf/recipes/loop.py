"""`rlhf loop`: online RLHF in rounds. Round r collects preference judgments on the *current* policy through the
collection app, refreshes the reward model on every judgment so far (warm-started from round r − 1's), then trains
the policy k RL steps against it (or one DPO round on the new pairs) from where round r − 1 left it.

Layout of the stage directory:
    collect.db              the app's database: every pair, its round and checkpoint, who judged it when
    round-<r>/collect/      the collect stage of round r (pairs sampled from the current policy, its export)
    round-<r>/train.jsonl   all rounds' pairs except the held-out prompts of round r
    round-<r>/heldout.jsonl the held-out prompts' pairs of round r: the refreshed reward model's eval set
    round-<r>/fresh.jsonl   every pair of round r: what the last round's reward model is scored on
    round-<r>/reward/       the refreshed reward model (a Hugging Face sequence classifier)
    round-<r>/rl/           the policy after round r
    probe/                  with `probe_judgments`: judgments of the final policy's samples, used for no training
    rounds.json             per-round metrics
    the final policy        in Hugging Face format at the top of the directory

Each part is a stage of its own, so a killed loop resumes where it was: complete parts are skipped, an interrupted
one resumes from its checkpoint, and the database keeps every acknowledged judgment. The KL of every round is taken
to the starting policy, which stays the reference throughout.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf import stage as stage_dir
from rlhf.config import Section, StageConfig, load_config
from rlhf.errors import UserError
from rlhf.stage import StageContext

DATABASE = "collect.db"
RL_KINDS = ("grpo", "ppo", "dpo")


class Part(Section):
    """One kind of stage the loop runs each round: its YAML and overrides on top."""

    config: str | None = Field(None, description="the stage's YAML config (null = the recipe's defaults)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value applied on top of config")


class RewardPart(Part):
    """The reward model refreshed every round."""

    backbone: str | None = Field(None, description="the reward model's backbone (model.path); null = `policy`")
    warm_start: bool = Field(True, description="start round r's reward model from round r − 1's (else a new head "
                             "on the backbone every round)")
    heldout_fraction: float = Field(0.25, gt=0, lt=1, description="fraction of the newest round's prompts whose "
                                    "pairs are held out: the refreshed model's accuracy on the current policy")


class RLPart(Part):
    """The policy update of each round."""

    kind: Literal["grpo", "ppo", "dpo"] = Field("grpo", description="grpo | ppo (against the refreshed reward model) "
                                                "| dpo (on the round's new pairs: iterative DPO)")
    steps_per_round: int = Field(8, ge=1, description="optimizer steps of each round (train.max_steps)")


class PeopleSettings(Section):
    """Real annotators: `rlhf collect serve` with pairs.follow_rounds on the same database serves each round."""

    wait_minutes: float = Field(60.0, gt=0, description="a round waits this long for its judgments, then goes on "
                                "with what arrived (at least one judgment)")
    poll_seconds: float = Field(5.0, gt=0, description="how often the loop counts the round's judgments")


class Config(StageConfig):
    """`rlhf loop`: online RLHF in rounds (collect on the current policy -> refresh the RM -> RL)."""

    policy: str | None = Field(None, description="the starting policy (e.g. the SFT stage's directory); also the "
                               "reference of every round's KL")
    rounds: int = Field(4, ge=1, description="number of rounds")
    judgments_per_round: int = Field(100, ge=1, description="judgments collected on the current policy each round")
    annotators: Literal["simulated", "people"] = Field(
        "simulated", description="simulated: the collect stage's simulated annotators judge over HTTP; people: wait "
        "for judgments made through a running `rlhf collect serve` (pairs.follow_rounds: true) on `database`")
    database: str | None = Field(None, description="SQLAlchemy URL of the collection database; null = "
                                 "<output_dir>/collect.db")
    people: PeopleSettings = Field(default_factory=PeopleSettings, description="waiting for real annotators")
    collect: Part = Field(default_factory=Part, description="the collect stage of each round (prompts, generation, "
                          "assignment, simulated annotators, export)")
    reward: RewardPart = Field(default_factory=RewardPart, description="the reward stage of each round")
    rl: RLPart = Field(default_factory=RLPart, description="the RL stage of each round")
    probe_judgments: int = Field(0, ge=0, description="after the last round, judgments of the final policy's samples "
                                 "(trained on by nothing): the final reward model's accuracy on its own policy")

    @model_validator(mode="after")
    def _budget(self) -> "Config":
        if self.annotators == "people" and self.probe_judgments:
            raise ValueError("probe_judgments needs simulated annotators")
        return self

    def database_url(self) -> str:
        return self.database or f"sqlite:///{Path(self.output_dir) / DATABASE}"


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    from rlhf.collect.storage import Store

    if cfg.policy is None:
        raise UserError("config key 'policy' is required (the starting policy, e.g. the SFT stage's directory)")
    if not Path(cfg.policy).exists():
        raise UserError(f"config key 'policy': {cfg.policy} does not exist (train it first)")
    if not ctx.resume:  # a new or changed loop starts from no rounds
        _clear(ctx.dir, cfg)
    loop = _Loop(cfg, ctx)
    store = Store.open(cfg.database_url())
    try:
        if not ctx.resume and (store.current_round() is not None or store.round_closed(1)):
            raise UserError(f"the database {cfg.database_url()} holds the rounds of an earlier loop (made with another "
                            "config); a new loop needs a new database (config key 'database'), or the old config")
        loop.check_budget(store)
        for r in range(1, cfg.rounds + 1):
            loop.round(store, r)
        metrics = loop.finish(store)
    finally:
        store.close()
    return metrics


def _clear(out: Path, cfg: Config) -> None:
    """Remove an earlier attempt's rounds, and its database when it is the loop's own with simulated judgments
    (people's judgments are never deleted: a database with an earlier loop's rounds is refused instead)."""
    for path in out.glob("round-*"):
        shutil.rmtree(path)
    shutil.rmtree(out / "probe", ignore_errors=True)
    if cfg.database is None and cfg.annotators == "simulated":
        for suffix in ("", "-wal", "-shm"):
            (out / (DATABASE + suffix)).unlink(missing_ok=True)


class _Loop:
    """The rounds' state: the current policy and reward model, and each part's fingerprint (a retrained part
    invalidates the parts after it, as in a pipeline)."""

    def __init__(self, cfg: Config, ctx: StageContext):
        self.cfg = cfg
        self.ctx = ctx
        self.policy = cfg.policy
        self.reward_model: str | None = None
        self.fingerprint = {"policy": (stage_dir.read_manifest(cfg.policy) or {}).get("fingerprint", "external")}
        self.rows: list[dict] = []
        self.steps = 0  # RL steps of the rounds before this one
        self.group = cfg.tracking.group or ctx.name

    # -- parts -------------------------------------------------------------------------------------------------

    def _run(self, kind: str, part: Part, out: Path, wiring: dict, inputs: dict[str, str]) -> dict:
        from rlhf.pipeline import recipe, run_stage

        overrides = {**part.overrides, **wiring, "output_dir": str(out), "seed": self.cfg.seed,
                     "tracking": self.cfg.tracking.model_copy(update={"group": self.group}).model_dump()}
        try:
            sub = load_config(recipe(kind).Config, part.config, overrides)
        except UserError as exc:
            raise UserError(f"loop {kind} stage: {exc}") from None
        name = f"{self.ctx.name}/{out.relative_to(self.ctx.dir)}"
        return run_stage(kind, sub, name=name, input_fingerprints=inputs, rerun=True, debug=self.ctx.debug)

    def rl_config(self):
        """The RL part's config as its recipe reads it (before the loop's wiring); a LoRA policy is refused."""
        from rlhf.pipeline import recipe

        rl_cfg = load_config(recipe(self.cfg.rl.kind).Config, self.cfg.rl.config, self.cfg.rl.overrides)
        if rl_cfg.model.lora is not None:
            raise UserError("loop rl stage: model.lora is not supported in a loop (a LoRA reference is the adapter's "
                            "own base, so the KL would be to the last round's policy, not the starting one)")
        return rl_cfg

    def collect_config(self):
        """The collect part's config as the collection app reads it (sampling the current policy)."""
        from rlhf.collect.settings import CollectConfig

        return load_config(CollectConfig, self.cfg.collect.config,
                           {**self.cfg.collect.overrides, "pairs.policy": self.policy})

    def check_budget(self, store) -> None:
        """Refuse settings that cannot make a round before anything runs."""
        self.rl_config()
        if self.cfg.annotators == "simulated":
            per_pair = self.collect_config().assignment.overlap
            if self.cfg.judgments_per_round < 2 * per_pair:
                raise UserError(f"judgments_per_round {self.cfg.judgments_per_round} is smaller than one round can "
                                f"use: at least two pairs × assignment.overlap {per_pair} (one prompt to train on, one "
                                "to hold out)")

    def _collect(self, store, r: int, out: Path, wanted: int) -> Path:
        """`wanted` judgments in round r (pairs of the current policy); returns the export of every judgment so
        far, and sets the collect fingerprint."""
        from rlhf.collect.export import export

        if self.cfg.annotators == "simulated":
            wiring = {"pairs.policy": self.policy, "pairs.round": r, "database": self.cfg.database_url(),
                      "simulate.judgments": wanted}
            result = self._run("collect", self.cfg.collect, out, wiring, {"pairs.policy": self.fingerprint["policy"]})
            store.close_round(r)
            self.fingerprint["collect"] = result["fingerprint"]
            return out / "preferences"
        if store.round_closed(r) and (out / "preferences").is_dir():  # a resumed loop: this round is done
            self.fingerprint["collect"] = f"{self.fingerprint['policy']}|{store.count_round_judgments(r)}"
            return out / "preferences"
        collect = self.collect_config()
        store.open_round(r, self.policy)
        deadline = time.monotonic() + 60 * self.cfg.people.wait_minutes
        print(f"[{self.ctx.name}] round {r}: waiting for {wanted} judgments of pairs from {self.policy} (serve "
              f"them with `rlhf collect serve` and pairs.follow_rounds: true on {self.cfg.database_url()})")
        while (have := store.count_round_judgments(r)) < wanted and time.monotonic() < deadline:
            time.sleep(self.cfg.people.poll_seconds)
        if have == 0:
            raise UserError(f"round {r}: no judgment arrived in {self.cfg.people.wait_minutes:g} minutes; rerun "
                            "the same command to wait again")
        store.close_round(r)
        out.mkdir(parents=True, exist_ok=True)
        staging = out / f"{stage_dir.TMP_PREFIX}-preferences"
        shutil.rmtree(staging, ignore_errors=True)
        export(store, staging, collect.export)
        shutil.rmtree(out / "preferences", ignore_errors=True)
        staging.rename(out / "preferences")
        self.fingerprint["collect"] = f"{self.fingerprint['policy']}|{have}"
        return out / "preferences"

    # -- one round ---------------------------------------------------------------------------------------------

    def round(self, store, r: int) -> None:
        cfg, top = self.cfg, self.ctx.dir / f"round-{r}"
        print(f"[{self.ctx.name}] round {r}/{cfg.rounds}: policy {self.policy}")
        exported = self._collect(store, r, top / "collect", cfg.judgments_per_round)
        new, old = _round_pairs(exported, r)
        train, heldout = _split_newest(new, cfg.reward.heldout_fraction, seed=cfg.seed * 1_000 + r)
        _save_rows(top / "train.jsonl", old + train)
        _save_rows(top / "heldout.jsonl", heldout)
        _save_rows(top / "fresh.jsonl", new)
        row = {"round": r, "policy": self.policy,
               "judgments": float(sum(store.count_round_judgments(i) for i in range(1, r + 1))),
               "round_pairs": float(len(new))}
        if self.reward_model is not None:  # the last round's reward model on the current policy's samples
            row["rm_fresh_accuracy"] = pairs_accuracy(self.reward_model, top / "fresh.jsonl")
        # the reward model is refreshed for DPO rounds too: its accuracy on fresh samples is the loop's gold-free signal
        wiring = {"model.path": cfg.reward.backbone or cfg.policy, "data.train": str(top / "train.jsonl"),
                  "data.eval": str(top / "heldout.jsonl"), "data.sample": None, "stats.policy": self.policy}
        inputs = {"data.train": self.fingerprint["collect"], "data.eval": self.fingerprint["collect"],
                  "stats.policy": self.fingerprint["policy"]}
        if cfg.reward.warm_start and self.reward_model is not None:
            wiring["model.warm_start"] = self.reward_model
            inputs["model.warm_start"] = self.fingerprint["reward"]
        rm = self._run("reward", cfg.reward, top / "reward", wiring, inputs)
        self.reward_model, self.fingerprint["reward"] = str(top / "reward"), rm["fingerprint"]
        row["rm_heldout_accuracy"] = rm["metrics"].get("eval/accuracy", float("nan"))
        wiring = self._rl_wiring(top)
        inputs = {key: self.fingerprint["reward"] for key in wiring if key.startswith(("rewards.", "critic."))}
        inputs["model.path"] = self.fingerprint["policy"]
        if "data.train" in wiring:
            inputs["data.train"] = self.fingerprint["collect"]
        rl = self._run(cfg.rl.kind, cfg.rl, top / "rl", wiring, inputs)
        self.policy, self.fingerprint["policy"] = str(top / "rl"), rl["fingerprint"]
        for key in ("eval/gold_score", "eval/rm_score", "train/reward"):
            if key in rl["metrics"]:
                row[key.replace("/", "_")] = rl["metrics"][key]
        row["gold_curve"] = [[self.steps + step, gold, kl] for step, gold, kl in _gold_history(top / "rl")]
        if row["gold_curve"] and row["gold_curve"][-1][2] is not None:
            row["train_kl"] = row["gold_curve"][-1][2]
        self.steps += cfg.rl.steps_per_round
        self.rows.append(row)
        self.ctx.tracker.log({f"loop/{k}": v for k, v in row.items() if isinstance(v, float)}, step=r)
        print(f"[{self.ctx.name}] round {r}: " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))

    def _rl_wiring(self, top: Path) -> dict:
        cfg = self.cfg
        wiring = {"model.path": self.policy, "model.ref_path": cfg.policy, "train.max_steps": cfg.rl.steps_per_round}
        rl_cfg = self.rl_config()
        if cfg.rl.kind == "dpo":
            return {**wiring, "data.train": str(top / "fresh.jsonl")}
        rewards = rl_cfg.rewards
        learned = [i for i, c in enumerate(rewards) if c.model is not None]
        if not learned:
            raise UserError(f"loop rl stage: its rewards have no `model` component for the refreshed reward model "
                            f"to fill (rl.config {cfg.rl.config})")
        wiring.update({f"rewards.{i}.model": self.reward_model for i in learned})
        if cfg.rl.kind == "ppo":
            wiring["critic.path"] = self.reward_model
        return wiring

    # -- the end -----------------------------------------------------------------------------------------------

    def finish(self, store) -> dict[str, float]:
        from rlhf.policy import PolicyModel

        cfg = self.cfg
        if cfg.probe_judgments:
            probe = self.ctx.dir / "probe"
            exported = self._collect(store, cfg.rounds + 1, probe / "collect", cfg.probe_judgments)
            new, _ = _round_pairs(exported, cfg.rounds + 1)
            _save_rows(probe / "pairs.jsonl", new)
            self.rows[-1]["final_rm_policy_accuracy"] = pairs_accuracy(self.reward_model, probe / "pairs.jsonl")
        stage_dir.atomic_write(self.ctx.dir / "rounds.json", lambda tmp: tmp.write_text(json.dumps(self.rows, indent=2)))
        PolicyModel.from_pretrained(self.policy).save(self.ctx.dir)
        last = self.rows[-1]
        curve = [point for row in self.rows for point in row["gold_curve"]]
        metrics = {f"loop/{k}": v for k, v in last.items() if isinstance(v, float)}
        if curve:
            step, peak, _ = max(curve, key=lambda point: point[1])
            metrics.update({"eval/gold_score": curve[-1][1], "loop/peak_gold_score": peak,
                            "loop/peak_rl_step": float(step)})
        return metrics


def _gold_history(rl_dir: Path) -> list[tuple[int, float, float | None]]:
    """(step, eval/gold_score, the last train/kl logged by then) of every evaluation an RL stage logged, in step
    order, one per step."""
    by_step, kl = {}, None
    path = rl_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        kl = float(row["train/kl"]) if "train/kl" in row else kl
        if "eval/gold_score" in row:
            by_step[int(row["step"])] = (float(row["eval/gold_score"]), kl)
    return [(step, gold, at) for step, (gold, at) in sorted(by_step.items())]


def _round_pairs(exported: Path, r: int) -> tuple[list[dict], list[dict]]:
    """The exported preference rows of round r's pairs, and those of every other round (gold items included)."""
    from datasets import load_from_disk

    rows = [dict(row) for row in load_from_disk(str(exported))]
    new = [row for row in rows if row.get("round") == r]
    if not new:
        raise UserError(f"round {r}: no pair of this round was judged (check collect.simulate and the pair source)")
    return new, [row for row in rows if row.get("round") is None or row["round"] < r]


def _split_newest(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): whole prompts held out, so no response is in both sets; at least one prompt each."""
    prompts = sorted({json.dumps(row["prompt"], sort_keys=True) for row in rows})
    if len(prompts) < 2:
        raise UserError("a round needs pairs of at least two prompts (one to train on, one to hold out): raise "
                        "judgments_per_round")
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: min(len(prompts) - 1, max(1, round(fraction * len(prompts))))])
    train = [row for row in rows if json.dumps(row["prompt"], sort_keys=True) not in held]
    return train, [row for row in rows if json.dumps(row["prompt"], sort_keys=True) in held]


def _save_rows(path: Path, rows: list[dict]) -> None:
    """Preference rows as JSONL, written whole or not at all."""
    from reward_models.pairs import write_jsonl

    stage_dir.atomic_write(path, lambda tmp: write_jsonl(rows, tmp))


def pairs_accuracy(reward_model: str, pairs_file: Path) -> float:
    """A reward model's accuracy (r_chosen > r_rejected, ties left out) on a preference file; of an ensemble, its
    first member's."""
    from reward_models.data import load_preferences
    from reward_models.evaluation import evaluate_pairs
    from reward_models.model import RewardModel

    rm = RewardModel.load(reward_model)
    rm.eval()
    metrics, _, _ = evaluate_pairs(rm, load_preferences(str(pairs_file), rm.tokenizer))
    return metrics["eval/accuracy"]
