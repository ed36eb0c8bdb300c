"""The `collect` pipeline stage: simulated annotators judge pairs from the policy over HTTP, then the judgments are
exported as a preference dataset the reward stage reads.

Artifacts in the stage directory:
    collect.db          the SQLite database (unless `database` points elsewhere)
    preferences/        `datasets.save_to_disk` dataset: prompt, chosen, rejected, margin, tie + metadata
    stats.json          agreement, position bias, gold accuracy, per-annotator counts
    leaderboard.json    Bradley-Terry ratings of the checkpoints (only with two checkpoints)
A resumed stage keeps its database and simulates only the judgments still missing.
"""

from __future__ import annotations

import json

from rlhf.collect.export import export
from rlhf.collect.report import summarize
from rlhf.collect.settings import CollectConfig
from rlhf.collect.simulate import simulate
from rlhf.collect.storage import Store

Config = CollectConfig
PREFERENCES_DIR = "preferences"


def run(cfg: CollectConfig, ctx) -> dict[str, float]:
    """Simulate, export and report. Returns `collect/*` metrics (NaN-free: undefined statistics are left out)."""
    db_file = ctx.dir / "collect.db"
    if cfg.database is None and not ctx.resume:
        for suffix in ("", "-wal", "-shm"):  # a fresh attempt starts from an empty database
            db_file.with_name(db_file.name + suffix).unlink(missing_ok=True)
    store = Store.open(cfg.database or f"sqlite:///{db_file}")
    if cfg.pairs.round is not None and not ctx.resume and store.drop_rounds_from(cfg.pairs.round):
        # a fresh attempt at a round (another policy or config upstream) starts without that round's old judgments
        print(f"{ctx.name}: judgments of round {cfg.pairs.round} and later from an earlier attempt removed")
    try:
        sim = simulate(cfg, store)
        summary = export(store, ctx.dir / PREFERENCES_DIR, cfg.export)
        stats = summarize(store.judgment_rows(), cfg.assignment.overlap, store.pair_counts(),
                          bootstrap=cfg.export.bootstrap, seed=cfg.seed)
    finally:
        store.close()
    (ctx.dir / "stats.json").write_text(json.dumps(stats, indent=2))
    if stats["leaderboard"]:
        (ctx.dir / "leaderboard.json").write_text(json.dumps(stats["leaderboard"], indent=2))
    latencies = sorted(sim.latencies_s)
    metrics = {
        "collect/judgments": float(stats["judgments"]),
        "collect/pairs_exported": float(summary["rows"]),
        "collect/alpha": stats["alpha"],
        "collect/percent_agreement": stats["percent_agreement"],
        "collect/left_win_rate": stats["left_win_rate"],
        "collect/gold_accuracy": stats["gold_accuracy"],
        "perf/submit_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
    }
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    ctx.tracker.log(metrics, step=int(stats["judgments"]))
    return metrics
