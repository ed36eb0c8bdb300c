"""Simulated annotators (`rlhf.world.SimulatedAnnotator`: the demo world's gold scorer plus noise) judging through
the same HTTP API people use, so simulation exercises the real server, assignment and storage paths.

Each simulated annotator is a thread with its own token and HTTP client. They judge what they are shown, and judge a
pair the same whichever side each response is on (the noise is a function of the annotator's index and the pair),
so with one simulated annotator a collection resumed after a kill makes the judgments an uninterrupted one makes
(with several, which of them judges which pair depends on timing); the position bias the admin page measures for
them is zero up to noise. An image prompt is told apart by its image: the simulator downloads it from the page's
image route, as a person sees it, and finds the record whose image file has those bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from rlhf.collect.settings import CollectConfig, SimulateSettings
from rlhf.errors import UserError

SIDE_OF_OUTCOME = {1.0: "left", 0.0: "right", 0.5: "tie"}
SIMULATED_PREFIX = "sim-"  # the names of simulated annotators: sim-<run id>-<index>


def prompt_key(prompt, images: list[bytes] = ()) -> str:
    """The key of a prompt as shown: its text, and for an image prompt the digests of its images' bytes (the same
    "<review> <image>" about a tent and about a lamp are two prompts)."""
    key = json.dumps(prompt, sort_keys=True)
    return key + "".join(f"|{hashlib.sha256(data).hexdigest()}" for data in images)


def prompt_lookup(cfg: CollectConfig) -> dict[str, tuple[str, dict | None]]:
    """prompt -> (task, meta) from the config's prompt/pair/gold files: what the simulated judges score with.

    The server never sends task metadata to annotators, so the simulation reads it from the same files the pairs
    were made from.
    """
    from pathlib import Path

    from rlhf.data import load_records
    from rlhf.vision import image_paths

    sources = [s for s in (cfg.pairs.prompts if not cfg.pairs.file else cfg.pairs.file, cfg.gold.file) if s]
    lookup = {}
    for source in sources:
        for rec in load_records(source):
            if rec.get("task"):
                images = [Path(f).read_bytes() for f in image_paths(rec)]
                lookup[prompt_key(rec.get("prompt"), images)] = (rec["task"], rec.get("meta"))
    if not lookup:
        raise UserError("simulated annotators need prompts with a `task` field (and `meta`) to score responses")
    return lookup


@dataclass
class SimulationResult:
    stored: int = 0  # new judgments acknowledged by the server (201)
    duplicates: int = 0
    latencies_s: list[float] = field(default_factory=list)
    stopped_because: str = ""


class _Budget:
    """A shared count of judgments still to make; each annotator claims one before asking for a pair."""

    def __init__(self, remaining: int):
        self.remaining = remaining
        self.lock = threading.Lock()

    def claim(self) -> bool:
        with self.lock:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            return True

    def release(self) -> None:
        with self.lock:
            self.remaining += 1


def run_simulation(base_url: str, tokens: list[str], lookup: dict, settings: SimulateSettings, remaining: int,
                   seed: int = 0) -> SimulationResult:
    """Let one simulated annotator per token judge over HTTP until `remaining` new judgments are stored, no pair is
    left for anyone, or `settings.timeout_s` passes."""
    from rlhf.world import SimulatedAnnotator

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the stage's log
    result = SimulationResult()
    budget = _Budget(remaining)
    deadline = time.monotonic() + settings.timeout_s
    lock = threading.Lock()
    errors: list[str] = []

    def annotate(index: int, token: str) -> None:
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            while time.monotonic() < deadline and not errors:
                if not budget.claim():
                    return
                reply = client.get("/api/next")
                reply.raise_for_status()
                body = reply.json()
                item = body["assignment"]
                if item is None:
                    budget.release()
                    if body["status"] in ("done", "error"):
                        return
                    time.sleep(0.2)  # pairs are being generated
                    continue
                shown = []
                for url in item.get("images") or []:  # an image prompt: look at its image, as a person would
                    image = client.get(url)
                    image.raise_for_status()
                    shown.append(image.content)
                task_meta = lookup.get(prompt_key(item["prompt"], shown))
                if task_meta is None:
                    errors.append(f"no task metadata for prompt {str(item['prompt'])[:80]!r}; a simulated "
                                  "annotator can only judge prompts of the configured prompt/pair/gold files")
                    return
                task, meta = task_meta
                # the noise of a judgment is a function of who judges which pair, not of the order things happened
                # or were shown in, so a collection resumed after a kill (new tokens, a restarted server, other
                # left/right draws) judges as an uninterrupted one
                judge = SimulatedAnnotator(temperature=settings.temperature, tie_rate=settings.tie_rate,
                                           seed=_item_seed(seed, index, item))
                first, second = sorted((item["left"], item["right"]))
                outcome = judge.judge(task, item["prompt"], first, second, meta)
                if first != item["left"]:
                    outcome = 1.0 - outcome
                started = time.perf_counter()
                sent = client.post("/api/judgments", json={"assignment_id": item["id"], "choice": SIDE_OF_OUTCOME[outcome]})
                elapsed = time.perf_counter() - started
                if sent.status_code == 409 and ("lease ran out" in sent.text or "has closed" in sent.text):
                    budget.release()  # judged too slowly (the slot went to someone else, or the round closed)
                    continue
                if sent.status_code not in (200, 201):
                    errors.append(f"judgment refused with {sent.status_code}: {sent.text[:200]}")
                    return
                with lock:
                    result.latencies_s.append(elapsed)
                    if sent.status_code == 201:
                        result.stored += 1
                    else:
                        result.duplicates += 1

    def guarded(index: int, token: str) -> None:
        try:
            annotate(index, token)
        except Exception as exc:  # noqa: BLE001 - reported below, in the caller's thread
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=guarded, args=(i, t), daemon=True) for i, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    if errors:
        raise RuntimeError(f"simulated annotator failed: {errors[0]}")
    result.stopped_because = (
        "target reached" if budget.remaining <= 0 else "timeout" if time.monotonic() >= deadline else "no pairs left"
    )
    return result


def _item_seed(seed: int, index: int, item: dict) -> int:
    """A stable seed for annotator `index` judging the shown pair, whichever side each response is on."""
    shown = json.dumps([seed, index, item["prompt"], *sorted((item["left"], item["right"]))], sort_keys=True)
    return int.from_bytes(hashlib.sha256(shown.encode()).digest()[:8], "big")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout stays machine-readable (`rlhf collect simulate` prints JSON)


def simulate(cfg: CollectConfig, store, source=None, log=_log) -> SimulationResult:
    """Serve `cfg`'s app on 127.0.0.1 (a free port) and let `cfg.simulate.annotators` simulated people judge until
    the database holds `cfg.simulate.judgments` judgments. `source` overrides the configured pair source."""
    from rlhf.collect.assign import Assigner
    from rlhf.collect.pairs import build_feeder
    from rlhf.collect.server import create_app
    from rlhf.collect.serving import ServerThread

    lookup = prompt_lookup(cfg)
    settings = cfg.simulate
    # in a round of `rlhf loop`: that round's judgments; otherwise all of the database's
    have = store.count_round_judgments(cfg.pairs.round) if cfg.pairs.round is not None else store.count_judgments()
    remaining = settings.judgments - have
    if remaining <= 0:
        log(f"collect: {have} judgments stored already; nothing to simulate")
        return SimulationResult(stopped_because="target reached")
    store.release_leases(SIMULATED_PREFIX)  # what a killed run's simulated people were shown goes to the new ones
    run_id = secrets.token_hex(3)  # tokens are stored hashed, so a resumed run signs up fresh simulated people
    tokens = [store.add_annotator(f"{SIMULATED_PREFIX}{run_id}-{i}") for i in range(settings.annotators)]
    feeder = build_feeder(cfg, store, source)
    app = create_app(cfg, store, Assigner(store, cfg.assignment, seed=cfg.seed), feeder)
    with ServerThread(app) as url:
        log(f"collect: {settings.annotators} simulated annotators judging at {url} until {settings.judgments} judgments")
        result = run_simulation(url, tokens, lookup, settings, remaining, seed=cfg.seed)
    if feeder.error:
        raise UserError(f"pair generation failed: {feeder.error}")
    log(f"collect: {result.stored} judgments stored ({result.stopped_because})")
    return result
