"""The one config schema of the collection app, shared by `rlhf collect ...` and the `collect` pipeline stage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rlhf.config import Section, StageConfig
from rlhf.errors import UserError


class ServerSettings(Section):
    """Where the web app listens and what it accepts."""

    host: str = Field("127.0.0.1", description="bind address; loopback by default so nothing is exposed by accident")
    port: int = Field(8765, ge=0, le=65535, description="TCP port (0 = any free port)")
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies are refused with 413")
    max_rationale_chars: int = Field(2000, ge=0, description="longest free-text rationale accepted")
    cookie_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]{1,64}$",
        description="session cookie name; null = rlhf_session on port 8765, rlhf_session_<port> on any other. Browsers "
        "share cookies between the ports of one host, so two servers on one host need two names",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses of reverse proxies (e.g. 127.0.0.1) whose X-Forwarded-Host and "
        "X-Forwarded-Proto are believed: needed behind a proxy that rewrites Host, or sign-in is refused"
    )
    session_hours: float = Field(
        168, gt=0, description="a browser sign-in lasts this long unless the annotator signs out or is revoked first"
    )


    def session_cookie(self) -> str:
        """The session cookie's name (over TLS the app prefixes `__Host-`)."""
        if self.cookie_name:
            return self.cookie_name
        return "rlhf_session" if self.port == 8765 else f"rlhf_session_{self.port}"


class GenerationSettings(Section):
    """How responses are sampled from the policy checkpoints."""

    max_new_tokens: int = Field(48, ge=1, description="response length cap in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (two samples of one policy must differ)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    prompts_per_batch: int = Field(8, ge=1, description="prompts per background generation call")


class PairSettings(Section):
    """Where pairs come from: one or two policy checkpoints sampled on a prompt set, or a fixed file of pairs."""

    policy: str | None = Field(
        None, description="policy checkpoint directory; alone, each pair is two samples of it for one prompt"
    )
    opponent: str | None = Field(
        None, description="second checkpoint: each pair is then one sample of `policy` against one of this"
    )
    prompts: str | None = Field(None, description="prompt set (jsonl/parquet/dataset dir) with a `prompt` field")
    task: str | None = Field(None, description="use only prompt records whose `task` field is this; null = all")
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts (after the task filter)")
    samples_per_prompt: int = Field(
        2, ge=2, description="one policy: K responses per prompt and every pair of distinct ones is served "
        "(InstructGPT's K-wise comparisons: C(K, 2) pairs, each response in K - 1 of them); 2 = one pair"
    )
    file: str | None = Field(
        None, description="jsonl of ready pairs (prompt, response_a, response_b[, source_a, source_b, task, meta])"
    )
    round: int | None = Field(
        None, ge=1, description="store the pairs as round N of an `rlhf loop` (sampled from `policy`), closing every "
        "other open round (its pairs stop being served and judgments of them are refused); simulate.judgments then "
        "counts this round's judgments"
    )
    follow_rounds: bool = Field(
        False, description="sample from the checkpoint of the database's open round (opened by `rlhf loop`), "
        "picking up each new round's checkpoint without a restart; pairs.policy is then not needed"
    )
    ready_ahead: int = Field(16, ge=1, description="keep this many pairs with open judgment slots generated ahead")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="sampling settings")

    @model_validator(mode="after")
    def _one_source(self) -> "PairSettings":
        if self.follow_rounds or self.round is not None:
            if self.file or self.opponent:
                raise ValueError("rounds sample one policy: pairs.round / pairs.follow_rounds take no pairs.file or "
                                 "pairs.opponent")
            if not self.prompts:
                raise ValueError("rounds need pairs.prompts")
            if self.round is not None and not self.policy:
                raise ValueError("pairs.round needs pairs.policy (the checkpoint of that round)")
            return self
        if bool(self.policy) == bool(self.file):
            raise ValueError("set exactly one of pairs.policy (with pairs.prompts) or pairs.file")
        if self.policy and not self.prompts:
            raise ValueError("pairs.policy needs pairs.prompts")
        if self.opponent and not self.policy:
            raise ValueError("pairs.opponent needs pairs.policy")
        if self.opponent and self.samples_per_prompt != 2:
            raise ValueError("pairs.samples_per_prompt applies to one policy; a head-to-head samples one each")
        return self

    def checkpoints(self) -> list[str]:
        """The checkpoints pairs are sampled from: one (two samples each) or two (head-to-head)."""
        return [c for c in (self.policy, self.opponent) if c]


class AssignmentSettings(Section):
    """Which pair an annotator sees next."""

    overlap: int = Field(2, ge=1, description="judgments wanted per pair, each from a different annotator")
    gold_rate: float = Field(0.1, ge=0, le=1, description="probability that the next item is a gold item")
    active: bool = Field(False, description="serve pairs the reward model is least certain about first")
    lease_seconds: float = Field(900, gt=0, description="a shown but unjudged pair holds its slot this long")


class GoldSettings(Section):
    """Items with known answers, mixed in to measure annotator accuracy."""

    file: str | None = Field(None, description="jsonl with prompt, chosen, rejected (chosen is the right answer)")
    world_margin: float | None = Field(
        None, gt=0, description="mark generated pairs gold when the demo world's gold scorer separates them by this"
    )
    max_items: int = Field(20, ge=0, description="stop marking generated pairs gold after this many gold items")


class GuidelineSettings(Section):
    """The judging instructions; their version is stored with every judgment."""

    file: str | None = Field(None, description="plain-text guidelines file; null = the built-in guidelines")
    version: str = Field("builtin-1", min_length=1, description="bump when the guidelines change")


class SimulateSettings(Section):
    """Simulated annotators (demo-world gold scorer plus noise) answering through the HTTP API."""

    annotators: int = Field(4, ge=1, description="number of simulated annotators")
    judgments: int = Field(200, ge=1, description="stop once this many judgments are stored")
    temperature: float = Field(0.5, gt=0, description="noise of the simulated preference (higher = noisier)")
    tie_rate: float = Field(0.05, ge=0, le=1, description="probability a simulated annotator answers tie")
    timeout_s: float = Field(1800, gt=0, description="give up after this many seconds")


class ExportSettings(Section):
    """How judgments become a preference dataset."""

    ties: Literal["drop", "keep"] = Field("drop", description="keep tied pairs (tie=True, margin 0) or drop them")
    min_judgments: int = Field(1, ge=1, description="export only pairs with at least this many judgments")
    include_gold: bool = Field(True, description="export gold items too (their labels are human judgments as well)")
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples for the leaderboard intervals")


class CollectConfig(StageConfig):
    """Preference collection: pairs from a policy, judgments from people (or simulated annotators), export."""

    database: str | None = Field(
        None, description="SQLAlchemy URL (sqlite:///file.db or postgresql+psycopg://...); null = <output_dir>/collect.db"
    )
    reward_model: str | None = Field(
        None, description="reward model directory scoring pairs for active selection (HF sequence classifier)"
    )
    server: ServerSettings = Field(default_factory=ServerSettings, description="web server")
    pairs: PairSettings = Field(description="pair source")
    assignment: AssignmentSettings = Field(default_factory=AssignmentSettings, description="assignment policy")
    gold: GoldSettings = Field(default_factory=GoldSettings, description="gold items")
    guidelines: GuidelineSettings = Field(default_factory=GuidelineSettings, description="judging guidelines")
    simulate: SimulateSettings = Field(default_factory=SimulateSettings, description="simulated annotators")
    export: ExportSettings = Field(default_factory=ExportSettings, description="dataset export")

    def database_url(self) -> str:
        """The database URL, defaulting to an SQLite file in the output directory."""
        if self.database:
            return self.database
        return f"sqlite:///{Path(self.output_dir) / 'collect.db'}"

    def guidelines_text(self) -> str:
        """The guidelines shown to annotators."""
        if self.guidelines.file is None:
            return BUILTIN_GUIDELINES
        path = Path(self.guidelines.file)
        if not path.is_file():
            raise UserError(f"guidelines file not found: {path}")
        return path.read_text()


BUILTIN_GUIDELINES = """\
Read the prompt, then both responses, and pick the response you would rather receive.

- Correctness first: a response that answers the question right beats one that does not.
- Then helpfulness: it follows the requested format and stays on the task.
- Then clarity: shorter is better when both are equally correct and complete.
- Tie: both are equally good (or equally flawed in the same way).
- Both bad: neither response is acceptable; this says nothing about which is better.
- Strength (optional): 1 = slightly better, 2 = clearly better, 3 = much better.
- Rationale (optional): one sentence on why; it helps when annotators disagree.
- Judge the content, never the position: A is not more likely to be better than B.

Keyboard: A or Left arrow = A, B or Right arrow = B, T = tie, X = both bad, 1-3 = strength, S = skip the pair,
U = undo your last judgment.
"""
