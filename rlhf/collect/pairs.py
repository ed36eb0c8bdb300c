"""Where pairs come from, and the background thread that keeps enough of them ready.

A *pair source* is anything with `next_batch() -> list[NewPair]` (an empty list = exhausted):
- `PolicyPairSource` samples one checkpoint K times per prompt (every pair of the K samples is served), or two
  checkpoints once each (a head-to-head);
- `FilePairSource` serves a jsonl of ready pairs (tests, or pairs generated elsewhere).
`PairFeeder` asks its source for more whenever fewer than `ready_ahead` pairs have open judgment slots, marks gold
items and scores reward-model uncertainty on the way in, so annotators never wait on a model call.

Image prompts (TRL's `images` column, paths relative to the record's file) are sampled with their image by a
vision-language policy, and a pair stores its prompt's image files as absolute paths; the judging page shows them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
from pathlib import Path
from typing import Callable, Protocol

from rlhf.collect.settings import CollectConfig, GenerationSettings
from rlhf.collect.storage import NewPair, Store
from rlhf.errors import UserError

log = logging.getLogger(__name__)

# (prompts, completions, each prompt's image files or None) -> reward scores
Scorer = Callable[[list, list[str], list | None], list[float]]


class PairSource(Protocol):
    def next_batch(self) -> list[NewPair]: ...


class FilePairSource:
    """Pairs read from a jsonl file: `prompt`, `response_a`, `response_b`, optional `source_a`, `source_b`,
    `task`, `meta`, `images`. Served in file order, `batch_size` at a time."""

    def __init__(self, path: str | Path, batch_size: int = 64):
        self.pairs = read_pair_file(path)
        self.batch_size = batch_size
        self.total = len(self.pairs)  # known up front: the judging page's progress target
        self._next = 0

    def next_batch(self) -> list[NewPair]:
        batch = self.pairs[self._next : self._next + self.batch_size]
        self._next += len(batch)
        return batch


def pair_images(record) -> list[str] | None:
    """A record's image files as absolute paths (opened once, so a missing or unreadable one is an error naming the
    record and field now, not a broken image on the page), or None for a text prompt."""
    from rlhf.vision import image_paths, record_images

    record_images(record)
    return image_paths(record) or None


def read_pair_file(path: str | Path) -> list[NewPair]:
    from rlhf.data import load_records, require_fields

    out = []
    for rec in load_records(str(path)):
        require_fields(rec, ["response_a", "response_b"], str)
        require_fields(rec, ["prompt"], (str, list))
        out.append(NewPair(
            prompt=rec["prompt"],
            response_a=rec["response_a"],
            response_b=rec["response_b"],
            source_a=str(rec.get("source_a") or "file"),
            source_b=str(rec.get("source_b") or "file"),
            task=rec.get("task"),
            meta=rec.get("meta"),
            images=pair_images(rec),
        ))
    return out


def read_gold_file(path: str | Path, seed: int = 0) -> list[NewPair]:
    """Gold items from a jsonl of `prompt`, `chosen`, `rejected`; which of the two is stored as A is drawn at
    random (the display order is randomized again per annotator)."""
    import random

    from rlhf.data import load_records, require_fields

    rng = random.Random(seed)
    out = []
    for rec in load_records(str(path)):
        require_fields(rec, ["chosen", "rejected"], str)
        require_fields(rec, ["prompt"], (str, list))
        chosen_first = rng.random() < 0.5
        a, b = (rec["chosen"], rec["rejected"]) if chosen_first else (rec["rejected"], rec["chosen"])
        out.append(NewPair(prompt=rec["prompt"], response_a=a, response_b=b, source_a="gold", source_b="gold",
                           task=rec.get("task"), meta=rec.get("meta"), gold_label=1.0 if chosen_first else 0.0,
                           images=pair_images(rec)))
    return out


class PolicyPairSource:
    """Two responses per prompt from policy checkpoints, cycling over the prompt set with a new seed each round.

    `policies` maps a display name (the checkpoint path) to a loaded `PolicyModel`; one entry = `samples_per_prompt`
    (K) samples of it and a pair for every two distinct ones (K-wise comparisons), two entries = one sample from each.
    Pairs with identical responses carry no preference, and blank responses
    (an immediate EOS) give nothing to read; both are skipped.
    """

    def __init__(self, policies: dict, prompts: list, generation: GenerationSettings, seed: int = 0,
                 samples_per_prompt: int = 2):
        if not 1 <= len(policies) <= 2:
            raise ValueError("PolicyPairSource takes one or two policies")
        if samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be at least 2")
        if not prompts:
            raise UserError("the prompt set is empty")
        self.policies = policies
        self.prompts = prompts
        self.generation = generation
        self.seed = seed
        self.samples_per_prompt = samples_per_prompt
        self._cursor = 0
        self._calls = 0

    def next_batch(self) -> list[NewPair]:
        k = self.generation.prompts_per_batch
        records = [self.prompts[(self._cursor + i) % len(self.prompts)] for i in range(k)]
        self._cursor = (self._cursor + k) % len(self.prompts)
        from rlhf.data import prompt_text

        tokenizer = next(iter(self.policies.values())).tokenizer
        texts = [prompt_text(r, tokenizer) for r in records]  # chat messages through the template
        self._calls += 1
        names = list(self.policies)
        if len(names) == 1:
            n = self.samples_per_prompt
            out = self._sample(names[0], texts, records, n=n)
            responses = [_all_pairs(out[n * i : n * (i + 1)]) for i in range(len(records))]
            sources = (names[0], names[0])
        else:
            first = self._sample(names[0], texts, records, n=1)
            second = self._sample(names[1], texts, records, n=1)
            responses = [[ab] for ab in zip(first, second)]
            sources = (names[0], names[1])
        return [
            NewPair(prompt=rec["prompt"], response_a=a, response_b=b, source_a=sources[0], source_b=sources[1],
                    task=rec.get("task"), meta=rec.get("meta"), images=pair_images(rec))
            for rec, prompt_pairs in zip(records, responses)
            for a, b in prompt_pairs
            if a != b and a.strip() and b.strip()
        ]

    def _sample(self, name: str, texts: list[str], records: list, n: int) -> list[str]:
        from rlhf.vision import images_for

        g = self.generation
        policy = self.policies[name]
        image_inputs = getattr(policy, "image_inputs", None)
        extra = {"images": images_for(records, image_inputs)} if image_inputs is not None else {}  # a VLM's images
        rollout = policy.generate(
            texts, n=n, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
            seed=self.seed * 1_000_003 + self._calls, **extra,
        )
        return rollout.completions


class RoundPairSource:
    """Pairs from the checkpoint of the store's open round (`Store.open_round`): when a new round opens, the next
    batch comes from its checkpoint, loaded then, so a serving app follows `rlhf loop` without a restart. Each pair
    carries its round. With no round open, `next_batch` returns None: nothing to generate yet."""

    def __init__(self, store: Store, cfg: CollectConfig):
        self.store = store
        self.cfg = cfg
        self.round: tuple[int, str] | None = None
        self._source: PolicyPairSource | None = None

    def next_batch(self) -> list[NewPair] | None:
        current = self.store.current_round()
        if current is None:
            return None
        if current != self.round:
            log.info("round %d: sampling pairs from %s", *current)
            seed = self.cfg.seed * 1_000 + current[0]
            self._source = policy_source(self.cfg, [current[1]], seed=seed, shuffle=True)
            self.round = current
        batch = [_replace(p, round=current[0]) for p in self._source.next_batch()]
        return batch or None  # nothing distinct this time (a collapsed policy): try again, never "exhausted"


def _all_pairs(responses: list[str]) -> list[tuple[str, str]]:
    """Every pair of the distinct responses, in sample order: ["x", "y", "x", "z"] -> (x, y), (x, z), (y, z)."""
    distinct = list(dict.fromkeys(responses))
    return list(itertools.combinations(distinct, 2))


def uncertainty(score_a: float, score_b: float) -> float:
    """1 - |2 p - 1| with p = sigmoid(score_a - score_b): 1 when the reward model sees a coin flip, 0 when sure."""
    p = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, score_a - score_b))))
    return 1.0 - abs(2.0 * p - 1.0)


def load_reward_scorer(path: str) -> Scorer:
    """A reward model trained by this project's reward stage (any HF sequence classifier with one label, or an image
    reward model, which reads each prompt's image file)."""
    from rlhf.vision import record_images
    from reward_models.model import RewardModel

    model = RewardModel.load(path)

    def score(prompts: list, completions: list[str], images: list | None = None) -> list[float]:
        texts = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
        pictures = None
        if model.image_inputs is not None:
            if images is None or not all(images):
                raise UserError(f"reward_model {path} is an image reward model: every pair needs its prompt's image")
            pictures = [record_images({"images": files})[0] for files in images]
        return model.score(texts, completions, images=pictures).tolist()

    return score


class GoldMarker:
    """Marks generated pairs gold when the demo world's gold scorer separates them by at least `margin`."""

    def __init__(self, margin: float, max_items: int, already: int):
        from rlhf.world import gold_score

        self.gold_score = gold_score
        self.margin = margin
        self.remaining = max(0, max_items - already)

    def mark(self, pair: NewPair) -> NewPair:
        if self.remaining <= 0 or pair.task is None or not isinstance(pair.prompt, str):
            return pair
        a = self.gold_score(pair.task, pair.prompt, pair.response_a, pair.meta)
        b = self.gold_score(pair.task, pair.prompt, pair.response_b, pair.meta)
        if abs(a - b) < self.margin:
            return pair
        self.remaining -= 1
        return _replace(pair, gold_label=1.0 if a > b else 0.0)


def _replace(pair: NewPair, **changes) -> NewPair:
    from dataclasses import replace

    return replace(pair, **changes)


class PairFeeder:
    """Background thread keeping `ready_ahead` pairs with open slots in the store.

    `wake()` after each judgment lets it top up at once; otherwise it re-checks every `poll_s`. A source error
    stops the thread rather than crashing the server: the traceback goes to the server log, the message to `error`
    (for the operator's terminal) and only the exception's type to `error_kind` (for the pages: an error message
    can quote SQL parameters, and with them hidden metadata such as a gold item's answer).
    """

    def __init__(self, store: Store, source: PairSource, *, ready_ahead: int, overlap: int, lease_seconds: float,
                 scorer: Scorer | None = None, gold: GoldMarker | None = None, poll_s: float = 2.0):
        self.store = store
        self.source = source
        self.ready_ahead = ready_ahead
        self.overlap = overlap
        self.lease_seconds = lease_seconds
        self.scorer = scorer
        self.gold = gold
        self.poll_s = poll_s
        self.exhausted = False
        self.error: str | None = None
        self.error_kind: str | None = None
        self.generated = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pair-feeder", daemon=True)

    def start(self) -> "PairFeeder":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def fill_once(self) -> int:
        """Generate one batch if fewer than `ready_ahead` pairs are open; returns pairs added (-1 = exhausted)."""
        if self.store.count_open_pairs(self.overlap, self.lease_seconds) >= self.ready_ahead:
            return 0
        batch = self.source.next_batch()
        if batch is None:  # a source with nothing to sample from yet (no round open)
            return 0
        if not batch:
            self.exhausted = True
            return -1
        if self.gold is not None:  # a gold item belongs to no round: its answer is known whichever policy wrote it
            batch = [_replace(q, round=None) if q.gold_label is not None else q for q in map(self.gold.mark, batch)]
        if self.scorer is not None:
            batch = self._score(batch)
        added = self.store.add_pairs(batch)
        self.generated += added
        return added

    def _score(self, batch: list[NewPair]) -> list[NewPair]:
        prompts = [p.prompt for p in batch]
        images = [p.images for p in batch] if any(p.images for p in batch) else None
        scores_a = self.scorer(prompts, [p.response_a for p in batch], images)
        scores_b = self.scorer(prompts, [p.response_b for p in batch], images)
        return [_replace(p, uncertainty=uncertainty(sa, sb)) for p, sa, sb in zip(batch, scores_a, scores_b)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                added = self.fill_once()
            except Exception as exc:  # noqa: BLE001 - surfaced on the admin page, the server keeps serving
                log.exception("pair generation failed")
                self.error = f"{type(exc).__name__}: {exc}"
                self.error_kind = type(exc).__name__
                return
            if added == -1:
                return
            if added == 0:
                self._wake.wait(self.poll_s)
                self._wake.clear()


def build_source(cfg: CollectConfig) -> PairSource:
    """The pair source a config describes (loads the policy checkpoints when it names them)."""
    if cfg.pairs.file:
        return FilePairSource(cfg.pairs.file)
    return policy_source(cfg, cfg.pairs.checkpoints(), seed=cfg.seed)


def policy_source(cfg: CollectConfig, checkpoints: list[str], seed: int, shuffle: bool = False) -> PolicyPairSource:
    """Pairs sampled from `checkpoints` (one or two) on the config's prompt set (in an order shuffled by `seed`
    with `shuffle`: each round of a loop starts on other prompts)."""
    from rlhf.data import load_prompts
    from rlhf.policy import PolicyModel

    for path in checkpoints:
        if not Path(path).exists():
            raise UserError(f"policy checkpoint not found: {path} (train one first: `rlhf run configs/demo/pipeline.yaml`)")
    prompts = load_prompts(cfg.pairs.prompts)
    if cfg.pairs.task is not None:
        prompts = [r for r in prompts if r.get("task") == cfg.pairs.task]
        if not prompts:
            raise UserError(f"{cfg.pairs.prompts}: no prompt has task {cfg.pairs.task!r} (pairs.task)")
    prompts = prompts[: cfg.pairs.max_prompts]
    if shuffle:
        import random

        random.Random(seed).shuffle(prompts)
    policies = {path: PolicyModel.from_pretrained(path) for path in checkpoints}
    from rlhf.data import prompt_text
    from rlhf.vision import check_image_prompts

    for path, policy in policies.items():  # image prompts need a vision-language policy, and the reverse
        check_image_prompts(prompts, policy.image_inputs, path, prompt_of=lambda r, p=policy: prompt_text(r, p.tokenizer))
    return PolicyPairSource(policies, prompts, cfg.pairs.generation, seed=seed,
                            samples_per_prompt=cfg.pairs.samples_per_prompt)


def build_feeder(cfg: CollectConfig, store: Store, source: PairSource | None = None) -> PairFeeder:
    """A feeder for `cfg` (gold items from `gold.file` are stored right away)."""
    if cfg.pairs.round is not None:
        if not Path(cfg.pairs.policy).exists():
            raise UserError(f"policy checkpoint not found: {cfg.pairs.policy} (pairs.policy of round {cfg.pairs.round})")
        store.open_round(cfg.pairs.round, cfg.pairs.policy)
    if source is None and (cfg.pairs.round is not None or cfg.pairs.follow_rounds):
        source = RoundPairSource(store, cfg)
    if cfg.gold.file:
        store.add_pairs(read_gold_file(cfg.gold.file, seed=cfg.seed))
    gold = None
    if cfg.gold.world_margin is not None:
        gold = GoldMarker(cfg.gold.world_margin, cfg.gold.max_items, already=store.count_gold())
    scorer = load_reward_scorer(cfg.reward_model) if cfg.reward_model else None
    if cfg.assignment.active and scorer is None:
        raise UserError("assignment.active needs reward_model (the model whose uncertainty picks the next pair)")
    return PairFeeder(
        store, source if source is not None else build_source(cfg),
        ready_ahead=cfg.pairs.ready_ahead, overlap=cfg.assignment.overlap,
        lease_seconds=cfg.assignment.lease_seconds, scorer=scorer, gold=gold,
    )
