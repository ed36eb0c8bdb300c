"""Demo preference pairs: K samples of the SFT policy per prompt, every pair of them labelled by simulated annotators.

As in InstructGPT (Ouyang et al. 2022, §3.5), K responses per prompt give C(K, 2) comparisons for K generations,
and training scores each response once for all of its comparisons (`data.group_by_prompt`).

Image prompts (a vision-language policy; the vision world's `image_add` / `image_review`) are sampled with their
image, and each pair row carries it in `images` (TRL's vision preference format), as an absolute path.

The annotators (`rlhf.world.SimulatedAnnotator`) apply the hidden gold scorer with Bradley-Terry noise — A wins with
probability σ((gold_A − gold_B) / temperature) — and declare a tie with probability `tie_rate`. Because the labels
are noisy, even the gold scorer does not rank every held-out pair "right": its accuracy on the noisy labels is the
**noise ceiling**, the best a reward model can expect to reach.

`python -m reward_models.pairs --out data/demo/preferences_example.jsonl` writes a small example file without any
policy (the two responses are demo-world reviews of the demonstration writers), for `configs/reward/minilm.yaml`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
from pathlib import Path

import torch
from pydantic import Field

from rlhf.config import Section
from rlhf.data import Record, prompt_text
from rlhf.errors import UserError
from rlhf.tracking import progress
from rlhf.vision import check_image_prompts, image_paths, images_for
from reward_models.data import PreferencePair
from reward_models.losses import pairwise_accuracy

log = logging.getLogger(__name__)


class PairSampling(Section):
    """Sample preference pairs from a policy and label them with simulated annotators (demo world)."""

    policy: str | None = Field(None, description="policy directory to sample from (the SFT stage output)")
    prompts: str = Field("data/demo/rl_prompts.jsonl", description="prompt records with task and meta")
    task: str | None = Field("review", description="only prompts of this task (null = every task)")
    num_prompts: int = Field(1000, ge=2, description="prompts to sample (cycling through the file; held-out ones "
                             "included)")
    samples_per_prompt: int = Field(4, ge=2, description="K responses per prompt; all C(K, 2) pairs are labelled")
    max_new_tokens: int = Field(48, ge=1, description="response budget per sample")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the policy")
    annotator_temperature: float = Field(
        0.2, ge=0.0, description="Bradley-Terry noise of the annotators: P(A) = σ((gold_A − gold_B) / T); 0 = exact"
    )
    tie_rate: float = Field(0.05, ge=0.0, le=1.0, description="probability an annotator declares a tie")
    batch_size: int = Field(32, ge=1, description="prompts per generate call (each gets K samples)")


def label_pair(annotator, row: Record, a: str, b: str, prompt: str | None = None) -> dict:
    """One TRL-format preference row: the annotator's winner is `chosen`; a tie keeps the order and sets `tie`.
    `prompt`: the prompt as the policy read it (default the record's own)."""
    prompt = row["prompt"] if prompt is None else prompt
    verdict = annotator.judge(row["task"], prompt, a, b, row.get("meta"))
    chosen, rejected = (b, a) if verdict == 0.0 else (a, b)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tie": verdict == 0.5,
            "task": row["task"], "meta": row.get("meta") or {}}


def sample_pairs(policy, prompts: list[Record], settings: PairSampling, seed: int) -> tuple[list[dict], list[dict]]:
    """Sample K responses per prompt and label every distinct pair of them. Returns (rows, samples): the samples are
    every response drawn ({prompt, completion}, plus `images` for an image prompt), for the reward statistics.

    Prompts are visited in a seeded order, cycling if `num_prompts` exceeds them. Identical or empty responses make
    no pair (counted in one warning). Each annotator call is independent, so labels of one prompt's pairs need not
    be transitive — as with real annotators.
    """
    from rlhf.world import SimulatedAnnotator

    if settings.task is not None:
        prompts = [r for r in prompts if r.get("task") == settings.task]
        if not prompts:
            raise UserError(f"{settings.prompts}: no prompts of task '{settings.task}'")
    check_image_prompts(prompts, policy.image_inputs, settings.policy or "the policy",
                        prompt_of=lambda r: prompt_text(r, policy.tokenizer))
    annotator = SimulatedAnnotator(settings.annotator_temperature, settings.tie_rate, seed=seed)
    order = random.Random(seed).sample(range(len(prompts)), len(prompts))
    k = settings.samples_per_prompt
    rows, samples, skipped = [], [], 0
    starts = range(0, settings.num_prompts, settings.batch_size)
    for start in progress(starts, total=len(starts), desc="sampling pairs"):
        chunk = [prompts[order[i % len(order)]] for i in range(start, min(start + settings.batch_size, settings.num_prompts))]
        texts = [prompt_text(r, policy.tokenizer) for r in chunk]  # chat messages through the policy's template
        rollout = policy.generate(texts, n=k, max_new_tokens=settings.max_new_tokens,
                                  temperature=settings.temperature, seed=seed + start,
                                  images=images_for(chunk, policy.image_inputs))
        paths = [image_paths(r) if policy.image_inputs is not None else [] for r in chunk]
        for j, (prompt, completion) in enumerate(zip(rollout.prompts, rollout.completions)):
            samples.append({"prompt": prompt, "completion": completion,
                            **({"images": paths[j // k]} if paths[j // k] else {})})
        for i, row in enumerate(chunk):
            responses = rollout.completions[i * k:(i + 1) * k]
            for a, b in itertools.combinations(responses, 2):
                if a == b or not a.strip() or not b.strip():
                    skipped += 1
                else:
                    pair = label_pair(annotator, row, a, b, prompt=texts[i])
                    rows.append({**pair, "images": paths[i]} if paths[i] else pair)
    if skipped:
        log.warning("skipped %d pair(s) of identical or empty responses", skipped)
    if not rows:
        raise UserError("the policy sampled no two different responses; raise data.sample.temperature")
    return rows, samples


def noise_ceiling(pairs: list[PreferencePair]) -> float | None:
    """Accuracy of the hidden gold scorer on the (noisy) labels of strict pairs, scored like the reward model (an
    exact gold tie counts one half). None when the pairs carry no demo-world `task`."""
    from rlhf.world import TASKS, gold_score

    strict = [p for p in pairs if not p.tie and p.extra.get("task") in TASKS]
    if not strict:
        return None
    diff = torch.tensor([
        gold_score(p.extra["task"], p.prompt, p.chosen, p.extra.get("meta"))
        - gold_score(p.extra["task"], p.prompt, p.rejected, p.extra.get("meta"))
        for p in strict
    ])
    return pairwise_accuracy(diff).item()


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def example_pairs(n: int, seed: int = 0, annotator_temperature: float = 0.2, tie_rate: float = 0.05) -> list[dict]:
    """`n` labelled pairs of review-task responses written by the world's demonstration writers (no model needed)."""
    from rlhf.world import SimulatedAnnotator
    from rlhf.world import reviews

    rng = random.Random(seed)
    annotator = SimulatedAnnotator(annotator_temperature, tie_rate, seed=seed)
    rows = []
    while len(rows) < n:
        product, color = rng.choice(reviews.PRODUCTS), rng.choice(reviews.COLORS)
        row = Record.at({"prompt": reviews.prompt(product, color), "task": "review",
                         "meta": reviews.meta(product, color)}, "example")
        a, b = (reviews.write_review(rng, product, rng.choice((reviews.DEMO, reviews.WEB))) for _ in range(2))
        if a != b:
            rows.append(label_pair(annotator, row, a, b))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write example demo-world preference pairs (TRL format JSONL).")
    parser.add_argument("--out", default="data/demo/preferences_example.jsonl")
    parser.add_argument("--n", type=int, default=400, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annotator-temperature", type=float, default=0.2)
    parser.add_argument("--tie-rate", type=float, default=0.05)
    args = parser.parse_args(argv)
    write_jsonl(example_pairs(args.n, args.seed, args.annotator_temperature, args.tie_rate), args.out)
    print(f"wrote {args.n} pairs to {args.out}")


if __name__ == "__main__":
    main()
