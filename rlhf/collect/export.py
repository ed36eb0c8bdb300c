"""Judgments -> a preference dataset in TRL's explicit-prompt format, plus the checkpoint leaderboard.

One row per pair, aggregating its judgments:
- each judgment votes +w for A, -w for B, 0 for tie / both bad, with w = strength / 3 (2/3 when no strength given);
- the pair's score is the mean vote: > 0 -> A chosen, < 0 -> B chosen, 0 -> a tie;
- `margin` = |score| in [0, 1] (TRL's RewardTrainer and this project's reward stage read a `margin` column);
- `tie` = True for tied pairs, which are kept only with `export.ties: keep` (TRL treats every row as a strict
  preference; this project's reward stage trains ties with label 1/2).
Columns: prompt, chosen, rejected (strings, or chat turns when the prompt is a conversation), margin, tie, and the
metadata pair_id, n_judgments, agreement, both_bad, is_gold, source_chosen, source_rejected, task, meta (a dict;
Arrow gives every row the union of keys, missing ones null), annotators, guidelines_versions. When any pair's prompt
has an image, `images` too: the image files (absolute paths; [] for a text pair), so the export is TRL's vision
preference format (prompt / chosen / rejected / images) and this project's reward stage and DPO read the images.
Pairs with a blank response are left out (this project's reward stage and TRL refuse them).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rlhf.collect.agreement import leaderboard
from rlhf.collect.report import comparisons
from rlhf.collect.settings import ExportSettings
from rlhf.errors import UserError

DEFAULT_STRENGTH = 2


def vote(choice: str, strength: int | None) -> float:
    """A judgment's signed vote for response A."""
    weight = (strength or DEFAULT_STRENGTH) / 3.0
    return {"a": weight, "b": -weight}.get(choice, 0.0)


def preference_rows(rows: list[dict], settings: ExportSettings) -> list[dict]:
    """Aggregate judgment rows (from `Store.judgment_rows`) into one preference row per pair, in pair order."""
    by_pair: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_pair[r["pair_id"]].append(r)
    out = []
    for pair_id in sorted(by_pair):
        group = by_pair[pair_id]
        first = group[0]
        if not first["response_a"].strip() or not first["response_b"].strip():
            continue  # preference readers (ours, TRL) refuse blank responses
        is_gold = first["gold_label"] is not None
        if len(group) < settings.min_judgments or (is_gold and not settings.include_gold):
            continue
        score = sum(vote(r["choice"], r["strength"]) for r in group) / len(group)
        tie = score == 0.0
        if tie and settings.ties == "drop":
            continue
        a_wins = score >= 0
        winner = "a" if score > 0 else "b" if score < 0 else None
        agreeing = sum((r["choice"] == winner) if winner else r["choice"] in ("tie", "both_bad") for r in group)
        chosen, rejected = (first["response_a"], first["response_b"]) if a_wins else (first["response_b"], first["response_a"])
        prompt = first["prompt"]
        if isinstance(prompt, list):
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
        out.append({
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "margin": round(abs(score), 6),
            "tie": tie,
            "pair_id": pair_id,
            "n_judgments": len(group),
            "agreement": agreeing / len(group),
            "both_bad": sum(r["choice"] == "both_bad" for r in group) / len(group),
            "is_gold": is_gold,
            "source_chosen": first["source_a"] if a_wins else first["source_b"],
            "source_rejected": first["source_b"] if a_wins else first["source_a"],
            "task": first["task"] or "",
            "meta": first["meta"],  # a dict: the reward stage scores held-out pairs with the world's gold scorer
            "annotators": sorted(r["annotator"] for r in group),
            "guidelines_versions": sorted({r["guidelines_version"] for r in group}),
            "images": first.get("images") or [],
            "round": first.get("round"),
        })
    for column in ("images", "round"):  # a text-only export outside rounds keeps its columns as they always were
        if not any(r[column] for r in out):
            for r in out:
                del r[column]
    return out


def write_dataset(rows: list[dict], out_dir: str | Path) -> Path:
    """Save rows with `datasets.Dataset.save_to_disk` (readable by `datasets.load_from_disk` and `rlhf.data`)."""
    from datasets import Dataset

    if not rows:
        raise UserError("nothing to export: no pair has enough judgments yet (see export.min_judgments)")
    kinds = {type(r["prompt"]).__name__ for r in rows}
    if len(kinds) > 1:
        raise UserError("cannot export a mix of plain-text and chat prompts into one dataset")
    out_dir = Path(out_dir)
    Dataset.from_list(rows).save_to_disk(str(out_dir))
    return out_dir


def export(store, out_dir: str | Path, settings: ExportSettings) -> dict:
    """Write the preference dataset of everything judged so far; returns counts for the caller to print/log."""
    judged = store.judgment_rows()
    rows = preference_rows(judged, settings)
    write_dataset(rows, out_dir)
    return {"judgments": len(judged), "rows": len(rows), "ties": sum(r["tie"] for r in rows), "path": str(out_dir)}


def leaderboard_table(store, bootstrap: int, seed: int = 0) -> list[dict]:
    """The Bradley-Terry leaderboard of checkpoints over all regular judgments, best first."""
    board = leaderboard(comparisons(store.judgment_rows()), bootstrap=bootstrap, seed=seed)
    if not board:
        raise UserError("a leaderboard needs judgments of pairs from two different checkpoints")
    return [row.__dict__ for row in board]


def format_leaderboard(board: list[dict]) -> str:
    """A plain-text table of `leaderboard_table` output."""
    lines = [f"{'rank':>4}  {'rating':>7}  {'95% CI':>15}  {'n':>5}  {'win':>5}  checkpoint"]
    for rank, row in enumerate(board, 1):
        ci = f"{row['low']:.0f}-{row['high']:.0f}"
        lines.append(f"{rank:>4}  {row['rating']:>7.0f}  {ci:>15}  {row['comparisons']:>5}  {row['win_rate']:>5.2f}  {row['name']}")
    return "\n".join(lines)
