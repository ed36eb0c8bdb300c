"""Gold-scored evaluation of a policy on held-out prompts: greedy, and optionally sampled (n per prompt at a
temperature), with per-prompt scores so two models can be compared with paired-bootstrap confidence intervals.

Scoring goes through a `ScoreFn` the caller passes: a scoring interface (rules and/or reward models, through
`scorer_score_fn`), or the demo world's gold scorers (`rlhf.world.gold_score_fn`), so `eval/...` is logged for any
prompts, not only the demo world's.
"""

from __future__ import annotations

import difflib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rlhf.config import GenerationSettings
from rlhf.data import Record, prompt_text
from rlhf.distributed import map_over_processes
from rlhf.errors import UserError
from rlhf.vision import images_for

# (prompts, completions, records (one per completion), ended) -> one score per completion, or (scores, extras): extras
# maps a name to one more score per completion (e.g. "rm_score": the training reward next to the gold score)
ScoreFn = Callable[[Sequence[str], Sequence[str], Sequence[dict], Sequence[bool]],
                   "Sequence[float] | tuple[Sequence[float], dict[str, Sequence[float]]]"]


def scorer_score_fn(gold, train=None) -> ScoreFn:
    """A scoring interface (`reward_models.Scorer`: anything with `score(...) -> .total`) as a `ScoreFn`: the `gold`
    scorer's total and, when `train` is another scorer, its score of the same completions as extra `rm_score` —
    gold vs training reward side by side shows reward over-optimization."""
    def score(prompts, completions, rows, ended):
        total = gold.score(prompts, completions, rows, ended=ended).total.tolist()
        if train is None or train is gold:
            return total
        return total, {"rm_score": train.score(prompts, completions, rows, ended=ended).total.tolist()}
    return score


@dataclass
class PromptScores:
    """Per-prompt results of one policy on one prompt set (rows in the order of the records)."""

    tasks: list[str]
    greedy: list[float]
    groups: list[str] = field(default_factory=list)  # finer labels (e.g. "add/reason") when grouped by more than the task
    extras: dict[str, list[float]] = field(default_factory=dict)  # name -> the score fn's extra scores of the greedy completions
    sampled: list[list[float]] = field(default_factory=list)  # (prompts, n) scores of the sampled completions
    lengths: list[int] = field(default_factory=list)  # greedy response lengths
    ended: list[bool] = field(default_factory=list)

    def sampled_mean(self) -> list[float]:
        return [sum(s) / len(s) for s in self.sampled]


@torch.no_grad()
def score_prompts(policy, records: list[Record], generation: GenerationSettings, score_fn: ScoreFn, seed: int = 0,
                  group_by: Sequence[str] = (), accelerator=None) -> PromptScores:
    """Greedy-decode (and, with `generation.samples` > 0, sample) every record's prompt and score the completions.

    Rows are grouped by `record["task"]` when present (else "all"), and further by the dotted record fields in
    `group_by` (e.g. `["meta.format"]`: "add/direct", "add/reason"). Each prompt's samples are seeded by `seed` and
    its position, so the scores are a function of the weights and `seed`, whatever the batching. With an
    `accelerator` of several processes, every process must call this: each scores its share of the batches and all
    get the whole result.
    """
    tasks = [str(r.get("task") or "all") for r in records]
    groups = ["/".join([t] + [str(v) for key in group_by if (v := _dotted(r, key)) is not None]) for t, r in zip(tasks, records)]
    parts = map_over_processes(lambda start: _score_batch(policy, records, start, generation, score_fn, seed),
                               range(0, len(records), generation.batch_size), accelerator, desc="eval")
    out = PromptScores(tasks=tasks, greedy=[], groups=groups if group_by else [])
    for part in parts:
        out.greedy += part["greedy"]
        for name, values in part["extras"].items():
            out.extras.setdefault(name, []).extend(values)
        out.lengths += part["lengths"]
        out.ended += part["ended"]
        out.sampled += part["sampled"]
    return out


def _score_batch(policy, records: list[Record], start: int, generation: GenerationSettings, score_fn: ScoreFn,
                 seed: int) -> dict:
    """Scores of the batch of records that begins at `start` (plain lists, so processes can exchange them)."""
    chunk = records[start:start + generation.batch_size]
    prompts = [prompt_text(r, policy.tokenizer) for r in chunk]  # chat messages through this model's template
    images = images_for(chunk, getattr(policy, "image_inputs", None))
    rollout = policy.generate(prompts, max_new_tokens=generation.max_new_tokens, greedy=True, backend=generation.backend,
                              images=images)
    greedy, extras = _split(score_fn(rollout.prompts, rollout.completions, chunk, rollout.ended.tolist()))
    part = {"greedy": greedy, "extras": extras, "lengths": rollout.lengths.tolist(),
            "ended": rollout.ended.tolist(), "sampled": []}
    if generation.samples:
        k = generation.samples
        rollout = policy.generate(prompts, n=k, max_new_tokens=generation.max_new_tokens,
                                  temperature=generation.temperature, seed=seed, first_prompt=start,
                                  backend=generation.backend, images=images)
        rows = [chunk[i] for i in rollout.prompt_index.tolist()]
        scores, _ = _split(score_fn(rollout.prompts, rollout.completions, rows, rollout.ended.tolist()))
        part["sampled"] = [scores[i * k:(i + 1) * k] for i in range(len(chunk))]
    return part


def _split(result) -> tuple[list[float], dict[str, list[float]]]:
    scores, extras = result if isinstance(result, tuple) else (result, {})
    return [float(s) for s in scores], {k: [float(v) for v in vs] for k, vs in extras.items()}


def check_group_by(records: Sequence[dict], group_by: Sequence[str], source: str) -> None:
    """Every `group_by` field must be present in some record (a misspelt one would report nothing)."""
    for key in group_by:
        if not any(_dotted(r, key) is not None for r in records):
            fields = sorted({k for r in records for k in _dotted_keys(r)})
            hint = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            raise UserError(f"config key 'group_by': no prompt of {source} has a field '{key}'"
                            + (f" (did you mean '{hint[0]}'?)" if hint else f"; fields: {', '.join(fields[:12])}"))


def _dotted_keys(node: dict, prefix: str = "", depth: int = 0) -> list[str]:
    keys = []
    for k, v in node.items():
        keys.append(prefix + str(k))
        if isinstance(v, dict) and depth < 3:
            keys += _dotted_keys(v, f"{prefix}{k}.", depth + 1)
    return keys


def _dotted(record: dict, key: str):
    node = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def summarize(scores: PromptScores, k: int | None = None) -> dict[str, float]:
    """Metrics of one policy: `eval/gold_score[/<task>]` (greedy), `eval/sampled/gold_score[/<task>]` (mean over
    samples), `eval/sampled/pass@k[/<task>]` (mean over prompts of the best of k samples: pass@k for 0/1 scores),
    response length and the fraction cut at the budget. The unsuffixed score is the mean over tasks."""
    if not scores.greedy:
        return {}
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(scores.tasks):
        by_task[task].append(i)
    metrics: dict[str, float] = {}

    by_group: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(scores.groups):
        if group != scores.tasks[i]:
            by_group[group].append(i)

    def per_task(name: str, values: list[float]) -> None:
        means = {t: sum(values[i] for i in rows) / len(rows) for t, rows in sorted(by_task.items())}
        metrics.update({f"{name}/{t}": v for t, v in means.items()})
        metrics[name] = sum(means.values()) / len(means)
        metrics.update({f"{name}/{g}": sum(values[i] for i in rows) / len(rows) for g, rows in sorted(by_group.items())})

    per_task("eval/gold_score", scores.greedy)
    if scores.sampled:
        per_task("eval/sampled/gold_score", scores.sampled_mean())
        per_task("eval/sampled/pass@k", [max(s) for s in scores.sampled])
        metrics["eval/sampled/k"] = float(k or len(scores.sampled[0]))
    metrics.update({f"eval/{name}": sum(v) / len(v) for name, v in scores.extras.items() if v})
    metrics["eval/response_length"] = sum(scores.lengths) / len(scores.lengths)
    metrics["eval/truncated_frac"] = 1.0 - sum(scores.ended) / len(scores.ended)
    return metrics


def evaluate_gold(policy, records: list[Record], generation: GenerationSettings, score_fn: ScoreFn, seed: int = 0,
                  accelerator=None) -> dict[str, float]:
    """`summarize(score_prompts(...))`: the metrics every stage logs as `eval/...` ({} when nothing is scored).
    With an `accelerator`, the prompts are split over its processes (every process must call this)."""
    return summarize(score_prompts(policy, records, generation, score_fn, seed, accelerator=accelerator))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 5000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of b − a over prompts with a percentile bootstrap CI that resamples prompts (paired: the same prompts
    for both models, so prompt difficulty cancels). Returns {"diff", "lo", "hi"}."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two equal, non-empty score lists (got {len(a)} and {len(b)})")
    diff = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    idx = torch.randint(len(diff), (n_boot, len(diff)), generator=torch.Generator().manual_seed(seed))
    means = diff[idx].mean(1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return {"diff": float(diff.mean()), "lo": lo, "hi": hi}


def format_ci(ci: dict[str, float]) -> str:
    """'+0.071 [+0.032, +0.110]'"""
    return f"{ci['diff']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]" if all(map(math.isfinite, ci.values())) else "n/a"
