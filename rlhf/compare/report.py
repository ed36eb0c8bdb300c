"""The local comparison report: `report.html` (everything inlined, no network request) plus PNGs and summary.json.

It reads only what the runs wrote: `runs.json` (the plan, so a missing or failed run is listed, never dropped), each
run's `manifest.json` and `metrics.jsonl`, and `completions.json`. Numbers in the tables are those of metrics.jsonl:

    final gold   the last logged `eval/gold_score` (the final evaluation at the budget)
    best gold    the highest `eval/gold_score` at any evaluation, and the samples where it peaked
    RM score     the last `eval/rm_score`: the training reward of the same held-out completions
    reward, KL   the last `train/reward`, `train/kl`; samples / tokens / seconds: the last progress axes
    throughput   mean `perf/tokens_per_s`; memory: max `perf/peak_rss_gb`

Across seeds: the mean and a 95% Student-t interval (mean ± t₀.₉₇₅,ₙ₋₁ · sd / √n); curves show the mean and the
min–max band. A run *collapsed* (reward over-optimization) when its gold score fell at least `DROP` below its peak
by the end while its RM score rose after that peak.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf import stage as stage_dir
from rlhf.compare.config import BASE_EVAL_FILE, BEST_OF_N_FILE, COMPLETIONS_FILE, PLAN_FILE
from rlhf.compare.overoptimization import fit_gao, gao_curve
from rlhf.tracking import METRICS_FILE

REPORT_DIR = "report"
DROP = 0.02  # gold-score fall from the peak that counts as a collapse (scores here are in [0, 1])
# two-sided 95% Student-t quantiles by degrees of freedom
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

# per-run columns: (key, heading, format)
RUN_COLUMNS = [
    ("final_gold", "final gold", ".3f"), ("best_gold", "best gold", ".3f"), ("best_at", "peak at", ".0f"),
    ("final_rm", "RM score", ".3f"), ("final_reward", "train reward", ".3f"), ("final_kl", "KL", ".3f"),
    ("samples", "samples", ".0f"), ("tokens", "tokens", ".0f"), ("seconds", "seconds", ".0f"),
    ("tokens_per_s", "tokens/s", ".0f"), ("peak_rss_gb", "peak GiB", ".2f"),
]
ARM_COLUMNS = ["final_gold", "best_gold", "final_rm", "final_kl", "samples", "seconds"]


def t975(n: int) -> float:
    """The 97.5% quantile of Student's t with n − 1 degrees of freedom (n ≥ 2)."""
    df = n - 1
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df


def mean_ci(values: list[float]) -> dict[str, Any]:
    """{"mean", "half" (95% t half-width; None for one value), "n", "values"} of the finite values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "half": None, "n": 0, "values": []}
    half = t975(len(vals)) * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "half": half, "n": len(vals), "values": vals}


# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class RunResult:
    plan: dict
    status: str  # complete | failed | running (interrupted, resumable) | missing
    error: str | None
    rows: list[dict] = field(default_factory=list)

    def __getattr__(self, name):  # plan fields: arm, algorithm, seed, name, dir...
        try:
            return self.__dict__["plan"][name]
        except KeyError:
            raise AttributeError(name) from None

    def series(self, key: str, x: str) -> list[tuple[float, float]]:
        """(x, value) of every row holding both, one point per x (the last logged)."""
        points: dict[float, float] = {}
        for row in self.rows:
            if key in row and x in row and _num(row[key]):
                points[float(row[x])] = float(row[key])
        return sorted(points.items())

    def last(self, key: str) -> float | None:
        value = None
        for row in self.rows:
            if key in row and _num(row[key]):
                value = float(row[key])
        return value


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_runs(out_dir: str | Path) -> tuple[dict, list[RunResult]]:
    out = Path(out_dir)
    plan = json.loads((out / PLAN_FILE).read_text())
    results = []
    for item in plan["runs"]:
        manifest = stage_dir.read_manifest(item["dir"])
        outcome = item.get("outcome") or {}
        path = Path(item["dir"]) / METRICS_FILE
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        if manifest is None:
            status = "failed" if outcome.get("status") == "failed" else "missing"
        else:
            status = manifest.get("status", "?")
            status = {"running": "interrupted"}.get(status, status)
            if manifest.get("fingerprint") and outcome.get("status") == "failed" and status != "complete":
                status = "failed"
        error = outcome.get("error") if status != "complete" else None
        results.append(RunResult(plan=item, status=status, error=error, rows=rows))
    return plan, results


# ---------------------------------------------------------------------------------------------------------------
# Numbers


def run_summary(run: RunResult, x: str = "progress/samples", base: dict | None = None) -> dict[str, Any]:
    """One run's table row (see the module docstring); None where a run logged nothing for a column. `base`: the
    base checkpoint's eval metrics, the start the verdict measures from."""
    gold = run.series("eval/gold_score", x)
    rm = dict(run.series("eval/rm_score", x))
    best = max(gold, key=lambda p: p[1]) if gold else None
    rss = [float(r["perf/peak_rss_gb"]) for r in run.rows if _num(r.get("perf/peak_rss_gb"))]
    tps = [float(r["perf/tokens_per_s"]) for r in run.rows if _num(r.get("perf/tokens_per_s"))]
    out = {
        "name": run.name, "arm": run.arm, "algorithm": run.algorithm, "seed": run.seed, "status": run.status,
        "error": run.error, "dir": run.dir,
        "final_gold": run.last("eval/gold_score"), "best_gold": best[1] if best else None,
        "best_at": best[0] if best else None, "final_rm": run.last("eval/rm_score"),
        "rm_at_best": rm.get(best[0]) if best else None, "final_reward": run.last("train/reward"),
        "final_kl": run.last("train/kl"), "samples": run.last("progress/samples"), "tokens": run.last("progress/tokens"),
        "seconds": run.last("progress/seconds"), "tokens_per_s": statistics.fmean(tps) if tps else None,
        "peak_rss_gb": max(rss) if rss else None, "final_length": run.last("train/response_length"),
        "final_entropy": run.last("train/entropy"),
    }
    out["verdict"], out["collapsed"] = _verdict(gold, rm, x, base or {})
    return out


def _verdict(gold: list[tuple[float, float]], rm: dict[float, float], x: str, base: dict) -> tuple[str, bool]:
    """Where the gold score peaked, how the RM score moved, and whether the run over-optimized the reward: gold
    fell ≥ DROP below its peak by the end while the RM score rose after that peak (True)."""
    if not gold:
        return "no evaluation logged", False
    unit = x.split("/")[-1]
    (x0, g0), (x_end, g_end) = gold[0], gold[-1]
    r0 = rm.get(x0)
    if _num(base.get("eval/gold_score")):  # measured from the base checkpoint, where every run starts
        g0, r0 = float(base["eval/gold_score"]), (float(base["eval/rm_score"]) if _num(base.get("eval/rm_score")) else r0)
    x_peak, g_peak = max(gold, key=lambda p: p[1])
    r_peak, r_end = rm.get(x_peak), rm.get(x_end)
    rm_text = f"; RM {r0:.3f} → {r_end:.3f}" if r0 is not None and r_end is not None else ""
    if g_peak - g_end >= DROP and r_peak is not None and r_end is not None and r_end > r_peak:
        return (f"collapsed: gold peaked at {g_peak:.3f} at {x_peak:.0f} {unit} and fell to {g_end:.3f} "
                f"while the RM score rose {r_peak:.3f} → {r_end:.3f}"), True
    if g_peak - g_end >= DROP:
        return f"gold peaked at {g_peak:.3f} at {x_peak:.0f} {unit}, ended at {g_end:.3f}{rm_text}", False
    trend = "rose" if g_end - g0 >= DROP else "fell" if g0 - g_end >= DROP else "stayed flat"
    return f"gold {trend} {g0:.3f} → {g_end:.3f} (peak {g_peak:.3f} at {x_peak:.0f} {unit}){rm_text}", False


def gold_gain_vs_distance(runs: list[RunResult], arm: str, x: str, base: dict) -> list[tuple[float, float]]:
    """Every run of `arm`, every evaluation: (d = √KL(π‖π_ref) per sequence at that step, gold − the base's gold).
    Empty without the base's gold score (the gain is measured from it)."""
    if not _num(base.get("eval/gold_score")):
        return []
    g0 = float(base["eval/gold_score"])
    pts = []
    for r in runs:
        if r.arm == arm and r.rows:
            kl = dict(r.series("train/kl", x))
            pts += [(math.sqrt(max(kl[s], 0.0)), g - g0) for s, g in r.series("eval/gold_score", x) if s in kl]
    return pts


def gao_fits(runs: list[RunResult], arms: list[str], x: str, base: dict) -> dict[str, dict]:
    """Per arm: Gao et al.'s RL form d(α − β log d) fitted to the pooled seeds' gold gains, with the largest d
    reached (`d_max`)."""
    fits = {}
    for arm in arms:
        pts = gold_gain_vs_distance(runs, arm, x, base)
        fit = fit_gao([d for d, _ in pts], [g for _, g in pts], "rl") if pts else None
        if fit is not None:
            fits[arm] = {**fit, "d_max": max(d for d, _ in pts)}
    return fits


BEST_OF_N = "best-of-n"  # the baseline's name among the fits


def best_of_n_points(bon: dict | None, base: dict) -> list[tuple[float, float]]:
    """(d = √(log n − (n − 1)/n), best-of-n gold − best-of-1 gold) per n: the gain over the base's own samples
    (best-of-1 is one sample at the sampling temperature, where the RL curves start from the base's evaluation);
    empty without the baseline or without the base's gold score (the report then has no gains at all)."""
    if not bon or not _num(base.get("eval/gold_score")):
        return []
    g1 = next(row["gold"] for row in bon["curve"] if row["n"] == 1)
    return [(row["d"], row["gold"] - g1) for row in bon["curve"]]


def best_of_n_fit(bon: dict | None, base: dict) -> dict | None:
    """Gao et al.'s best-of-n form d(α − β·d) fitted to the baseline's gold gains."""
    pts = best_of_n_points(bon, base)
    fit = fit_gao([d for d, _ in pts], [g for _, g in pts], "bon") if pts else None
    return {**fit, "form": "bon", "d_max": max(d for d, _ in pts), "max_n": bon["samples"]} if fit else None


def gao_findings(fits: dict[str, dict]) -> list[str]:
    lines = []
    for arm, f in fits.items():
        form = "d(α − β·d)" if f.get("form") == "bon" else "d(α − β·log d)"
        what = f"n = 1 … {f['max_n']}" if f.get("form") == "bon" else f"{f['points']} evaluations"
        text = (f"{arm}: gold gain against d = √KL fits {form} (Gao et al. 2023) with α {f['alpha']:.3f}, "
                f"β {f['beta']:.3f} (RMSE {f['rmse']:.3f}, {what})")
        if f["d_peak"] is None:
            text += f": no peak (β ≤ 0), the gain still rising at the largest d reached, {f['d_max']:.2f}"
        else:
            where = "beyond" if f["d_peak"] > f["d_max"] else "within"
            text += (f": fitted peak gain {f['gain_peak']:+.3f} at d {f['d_peak']:.2f} (KL {f['d_peak'] ** 2:.2f}), "
                     f"{where} the largest d reached ({f['d_max']:.2f})")
        lines.append(text + ".")
    return lines


def arm_summaries(plan: dict, runs: list[RunResult], summaries: list[dict]) -> list[dict]:
    arms: list[str] = []
    for r in runs:
        if r.arm not in arms:
            arms.append(r.arm)
    out = []
    for arm in arms:
        rows = [s for s in summaries if s["arm"] == arm]
        done = [s for s in rows if s["status"] == "complete"]
        item = {"arm": arm, "algorithm": rows[0]["algorithm"], "runs": len(rows), "complete": len(done),
                "not_complete": [f"{s['name']} ({s['status']})" for s in rows if s["status"] != "complete"],
                "collapsed": sum(bool(s["collapsed"]) for s in done),
                "peaks": [s["best_at"] for s in done]}
        for key in ARM_COLUMNS + ["best_at", "tokens_per_s", "peak_rss_gb"]:
            item[key] = mean_ci([s[key] for s in done])
        plan_run = next(p for p in plan["runs"] if p["arm"] == arm)
        item.update({k: plan_run[k] for k in ("kind", "samples_per_step", "max_steps", "eval_every", "beta", "kl_target")})
        out.append(item)
    return out


def findings(arms: list[dict], unit: str) -> list[str]:
    """Plain sentences: the ranking by final gold score with CIs, whether the top two differ beyond seed noise, and
    where each algorithm peaked or collapsed."""
    ranked = sorted([a for a in arms if a["final_gold"]["mean"] is not None], key=lambda a: -a["final_gold"]["mean"])
    lines = []
    if not ranked:
        return ["No run finished with a gold evaluation."]
    lines.append("Final gold score (mean, 95% CI over seeds): " + "; ".join(
        f"{a['arm']} {_ci_text(a['final_gold'])} ({a['complete']}/{a['runs']} seeds)" for a in ranked) + ".")
    a = ranked[0]
    for b in ranked[1:]:  # the leader against each other arm
        diff = welch(a["final_gold"]["values"], b["final_gold"]["values"])
        if diff is None:
            lines.append(f"{a['arm']} leads {b['arm']}, but with fewer than two seeds each there is no interval.")
        elif diff["lo"] == diff["hi"] == 0:
            lines.append(f"{a['arm']} and {b['arm']} tie on every seed: no difference beyond seed noise.")
        elif diff["lo"] > 0:
            lines.append(f"{a['arm']} beats {b['arm']} by {diff['diff']:.3f} (95% Welch CI [{diff['lo']:.3f}, "
                         f"{diff['hi']:.3f}]): beyond seed noise.")
        else:
            lines.append(f"{a['arm']} leads {b['arm']} by {diff['diff']:.3f}, but the 95% Welch CI "
                         f"[{diff['lo']:.3f}, {diff['hi']:.3f}] includes 0: within seed noise.")
    with_kl = [x for x in ranked if x["final_kl"]["mean"] is not None]
    if with_kl:
        lines.append("At the end of the budget, KL(π‖π_ref) per sequence and held-out RM score: " + "; ".join(
            f"{x['arm']} KL {x['final_kl']['mean']:.3f}, RM {_ci_text(x['final_rm'])}" for x in with_kl) + ".")
    for a in arms:
        if a["complete"] == 0:
            lines.append(f"{a['arm']}: no complete run ({', '.join(a['not_complete'])}).")
            continue
        peaks = ", ".join(f"{p:.0f}" for p in a["peaks"] if p is not None)
        text = f"{a['arm']}: best gold {_ci_text(a['best_gold'])}, peaking at {peaks} {unit}"
        if a["collapsed"]:
            text += f"; over-optimized (gold fell while the RM score rose) in {a['collapsed']}/{a['complete']} seeds"
        if a["not_complete"]:
            text += f"; not complete: {', '.join(a['not_complete'])}"
        lines.append(text + ".")
    done = sum(a["complete"] for a in arms)
    if done and not any(a["collapsed"] for a in arms):
        lines.append(f"No run over-optimized within this budget: none had its gold score fall ≥ {DROP} below its peak "
                     "while its RM score rose.")
    return lines


def welch(a: list[float], b: list[float]) -> dict[str, float] | None:
    """Mean of a − b with a 95% Welch t interval (None with fewer than two values on a side)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "lo": diff, "hi": diff}
    df = (va + vb) ** 2 / ((va ** 2) / (len(a) - 1) + (vb ** 2) / (len(b) - 1))
    t = t975(max(2, int(df) + 1))
    return {"diff": diff, "lo": diff - t * se, "hi": diff + t * se}


def _ci_text(ci: dict) -> str:
    if ci["mean"] is None:
        return "–"
    return f"{ci['mean']:.3f}" + (f" ± {ci['half']:.3f}" if ci["half"] is not None else "")


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg): mean over seeds and the min–max band per arm


def _plots(runs: list[RunResult], arms: list[str], x: str, out: Path, base: dict,
           fits: dict[str, dict] | None = None, bon: dict | None = None) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    done = [r for r in runs if r.rows]
    xlabel = x
    files: dict[str, Path] = {}

    def band(ax, key: str, title: str, mark_peak: bool = False):
        start = {0.0: float(base[key])} if key.startswith("eval/") and _num(base.get(key)) else {}
        for arm in arms:
            series = [{**start, **dict(r.series(key, x))} for r in done if r.arm == arm]
            series = [s for s in series if len(s) > len(start)]
            if not series:
                continue
            xs = sorted(set().union(*series))
            vals = [[s[v] for s in series if v in s] for v in xs]
            mean = [statistics.fmean(v) for v in vals]
            ax.plot(xs, mean, color=colors[arm], label=f"{arm} (n={len(series)})", lw=2, marker="o" if len(xs) < 30 else None,
                    ms=3)
            if len(series) > 1:
                ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=colors[arm], alpha=0.18, lw=0)
            if mark_peak and mean:
                i = max(range(len(mean)), key=mean.__getitem__)
                ax.plot([xs[i]], [mean[i]], marker="*", ms=13, color=colors[arm], mec="black", mew=0.6)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)

    def save(fig, name: str):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[name] = path

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    band(axes[0], "eval/gold_score", "held-out gold score (★ = peak of the mean)", mark_peak=True)
    band(axes[1], "eval/rm_score", "held-out RM score (training reward)")
    axes[0].legend(fontsize=8)
    save(fig, "gold_and_rm_vs_samples.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    band(axes[0], "train/reward", "training reward (mean of the step's samples)")
    band(axes[1], "train/kl", "KL(π‖π_ref) per sequence")
    axes[0].legend(fontsize=8)
    save(fig, "reward_and_kl_vs_samples.png")

    def mean_pairs(arm: str, kx: str, ky: str, start: tuple | None = None) -> list[tuple[float, float]]:
        """(mean kx, mean ky) over the arm's seeds at each logged x where a seed has both, in x order."""
        acc: dict[float, list[tuple[float, float]]] = {}
        for r in done:
            if r.arm == arm:
                xs = dict(r.series(kx, x))
                for s, v in r.series(ky, x):
                    if s in xs:
                        acc.setdefault(s, []).append((xs[s], v))
        pts = [(statistics.fmean(a for a, _ in v), statistics.fmean(b for _, b in v)) for _, v in sorted(acc.items())]
        return ([start] if start and pts else []) + pts

    base_pt = ((float(base["eval/rm_score"]), float(base["eval/gold_score"]))
               if _num(base.get("eval/rm_score")) and _num(base.get("eval/gold_score")) else None)
    # the over-optimization plot: RM score (x) against gold score (y) at every evaluation, from the base (■); a run
    # that games the reward model moves right while falling. Then the KL–reward frontier (every step) and the gold
    # score against KL (every evaluation; Gao et al. 2023 plot gold against √KL)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for arm in arms:
        for r in done:
            if r.arm == arm:
                rm = dict(r.series("eval/rm_score", x))
                pts = ([base_pt] if base_pt else []) + [(rm[s], g) for s, g in r.series("eval/gold_score", x) if s in rm]
                if len(pts) > 1:
                    axes[0].plot(*zip(*pts), color=colors[arm], lw=0.8, alpha=0.35)
        pts = mean_pairs(arm, "eval/rm_score", "eval/gold_score", base_pt)
        if pts:
            axes[0].plot(*zip(*pts), color=colors[arm], marker="o", ms=4, lw=2, label=arm)
            axes[0].plot(*pts[0], marker="s", color=colors[arm], mec="black", ms=7)
            axes[0].plot(*max(pts, key=lambda p: p[1]), marker="*", color=colors[arm], mec="black", ms=14)
        pts = mean_pairs(arm, "train/kl", "train/reward")
        if pts:
            axes[1].scatter(*zip(*pts), color=colors[arm], s=14, alpha=0.75, label=arm)  # noisy per step: points
        pts = gold_gain_vs_distance(runs, arm, x, base)
        if pts:  # every seed's evaluations, and Gao et al.'s fitted curve with its peak (◆)
            axes[2].scatter(*zip(*pts), color=colors[arm], s=14, alpha=0.6, label=arm)
            fit = (fits or {}).get(arm)
            if fit is not None:
                top = max(fit["d_max"], min(fit["d_peak"] or 0.0, 2 * fit["d_max"]))
                ds = [top * i / 60 for i in range(61)]
                axes[2].plot(ds, gao_curve(fit, ds), color=colors[arm], ls="--", lw=1.5)
                if fit["d_peak"] is not None and fit["d_peak"] <= top:
                    axes[2].plot([fit["d_peak"]], [fit["gain_peak"]], marker="D", color=colors[arm], mec="black", ms=7)
    pts = best_of_n_points(bon, base)
    if pts:  # the baseline: best-of-n of the base at its analytic KL, with the d(α − β·d) fit
        axes[2].plot(*zip(*pts), color="black", marker="x", ls="", ms=7, label=f"{BEST_OF_N} (n ≤ {bon['samples']})")
        fit = (fits or {}).get(BEST_OF_N)
        if fit is not None:
            ds = [fit["d_max"] * i / 60 for i in range(61)]
            axes[2].plot(ds, gao_curve(fit, ds, "bon"), color="black", ls=":", lw=1.5)
    labels = [("over-optimization: RM vs gold (■ base, ★ best)", "eval/rm_score", "eval/gold_score"),
              ("KL–reward frontier (every step)", "train/kl (per sequence)", "train/reward"),
              ("gold gain vs √KL: d(α − β log d) fits (◆ peak)", "d = √KL(π‖π_ref) per sequence",
               "eval/gold_score − base")]
    for ax, (title, xl, yl) in zip(axes, labels):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.lines or ax.collections:
            ax.legend(fontsize=8)
    save(fig, "overoptimization_and_kl_frontier.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    band(axes[0], "train/response_length", "response length (tokens)")
    band(axes[1], "train/entropy", "policy entropy (nats / token)")
    axes[0].legend(fontsize=8)
    save(fig, "length_and_entropy.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, key, title in ((axes[0], "perf/tokens_per_s", "throughput (generated tokens / s, mean)"),
                           (axes[1], "perf/peak_rss_gb", "peak memory (GiB RSS, max)")):
        means, errs = [], []
        for arm in arms:
            per_run = [[float(row[key]) for row in r.rows if _num(row.get(key))] for r in done if r.arm == arm]
            per_run = [(statistics.fmean(v) if "tokens" in key else max(v)) for v in per_run if v]
            means.append(statistics.fmean(per_run) if per_run else 0.0)
            errs.append((max(per_run) - min(per_run)) / 2 if len(per_run) > 1 else 0.0)
        ax.bar(range(len(arms)), means, yerr=errs, color=[colors[a] for a in arms], capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=15)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    save(fig, "throughput_and_memory.png")
    return files


# ---------------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1240px;color:#1d1d1f;
padding:0 16px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555} table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #d0d0d0;padding:4px 8px;
text-align:right;vertical-align:top;white-space:nowrap} th{background:#f3f3f3;white-space:normal}
td.l,th.l{text-align:left;white-space:normal}
tr.bad td{background:#fff1f0} tr.warn td{background:#fffbe6} .ok{color:#137333} .err{color:#b3261e}
img{max-width:100%;border:1px solid #eee;margin:6px 0} ul.findings li{margin:3px 0}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.35 ui-monospace,Menlo,Consolas,monospace}
.score{color:#555;font-size:12px} .small{font-size:12px;color:#555}
"""


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else html.escape(str(v))


def _cell(v: Any, spec: str) -> str:
    """A number cell that carries the exact value (data-value) behind the rounded text."""
    data = repr(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
    return f'<td data-value="{data}">{_fmt(v, spec)}</td>'


def _ci_cell(ci: dict, spec: str) -> str:
    if ci["mean"] is None:
        return '<td data-mean="">–</td>'
    half = f" ± {format(ci['half'], spec)}" if ci["half"] else ""  # no "± 0" for what every seed shares (samples)
    return (f'<td data-mean="{ci["mean"]!r}" data-half="{ci["half"]!r}" title="{html.escape(repr(ci["values"]))}">'
            f"{format(ci['mean'], spec)}{half}</td>")


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _completions_html(out: Path) -> str:
    path = out / COMPLETIONS_FILE
    if not path.is_file():
        return "<p class='small'>No completions (no run finished, or eval.completions is 0).</p>"
    data = json.loads(path.read_text())
    cols = data["columns"]
    head = "".join(f"<th class='l'>{html.escape(c['arm'])}" + (f" <span class='small'>(seed {c['seed']})</span>"
                                                            if c.get("seed") is not None else "") + "</th>" for c in cols)
    rows = []
    for i, prompt in enumerate(data["prompts"]):
        cells = "".join(
            f"<td class='l'><pre>{html.escape(c['rows'][i]['completion'])}</pre><span class='score'>gold "
            f"{c['rows'][i]['gold']:.3f} · RM {c['rows'][i]['rm']:.3f}{'' if c['rows'][i]['ended'] else ' · cut'}</span></td>"
            for c in cols)
        rows.append(f"<tr><td class='l'><pre>{html.escape(str(prompt))}</pre></td>{cells}</tr>")
    return (f"<p class='small'>Greedy completions of each algorithm's final policy on the first {len(data['prompts'])} "
            f"held-out prompts; gold = {html.escape(', '.join(data['gold']) or 'the training reward')}, "
            f"RM = {html.escape(', '.join(data['reward']))}.</p>"
            f"<table id='completions'><tr><th class='l'>prompt</th>{head}</tr>{''.join(rows)}</table>")


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """Write `<out_dir>/report.html`, `<out_dir>/report/*.png`, `summary.json` and `summary.md`. Returns
    {"html", "runs" (per-run rows), "arms", "findings", "text" (the markdown summary table)}."""
    out = Path(out_dir)
    plan, runs = load_runs(out)
    x = "progress/tokens" if "tokens" in plan.get("budget", {}) else "progress/samples"
    unit = x.split("/")[-1]
    base_path = out / BASE_EVAL_FILE
    base = json.loads(base_path.read_text())["metrics"] if base_path.is_file() else {}
    summaries = [run_summary(r, x, base) for r in runs]
    arms = arm_summaries(plan, runs, summaries)
    arm_names = [a["arm"] for a in arms]
    found = findings(arms, unit)
    fits = gao_fits(runs, arm_names, x, base)
    bon_path = out / BEST_OF_N_FILE
    bon = json.loads(bon_path.read_text()) if bon_path.is_file() else None
    if (bon_fit := best_of_n_fit(bon, base)) is not None and BEST_OF_N not in fits:  # an arm of that name wins
        fits[BEST_OF_N] = bon_fit
    found += gao_findings(fits)
    if _num(base.get("eval/gold_score")):
        rm_text = f", RM score {base['eval/rm_score']:.3f}" if _num(base.get("eval/rm_score")) else ""
        found.insert(0, f"The base checkpoint scores gold {base['eval/gold_score']:.3f}{rm_text} on the held-out prompts "
                        f"(every curve starts there, at 0 {unit}).")
    figdir = out / REPORT_DIR
    figdir.mkdir(exist_ok=True)
    figures = _plots(runs, arm_names, x, figdir, base, fits, bon) if any(r.rows for r in runs) else {}
    text = markdown_table(arms)
    (out / "summary.json").write_text(json.dumps({"runs": summaries, "arms": arms, "findings": found,
                                                  "gao_fits": fits}, indent=1))
    (out / "summary.md").write_text(text + "\n\n" + "\n".join(f"- {line}" for line in found) + "\n")

    budget = ", ".join(f"{v} {k}" for k, v in plan["budget"].items())
    arm_rows = []
    for a in arms:
        cls = "bad" if a["complete"] == 0 else "warn" if a["not_complete"] else ""
        arm_rows.append(
            f"<tr class='{cls}' data-arm='{html.escape(a['arm'])}'><td class='l'>{html.escape(a['arm'])}</td>"
            f"<td class='l'>{html.escape(a['kind'])}</td><td>{a['complete']}/{a['runs']}</td>"
            + "".join(_ci_cell(a[k], ".0f" if k in ("samples", "seconds") else ".3f") for k in ARM_COLUMNS)
            + _ci_cell(a["best_at"], ".0f")
            + f"<td>{a['collapsed']}/{a['complete']}</td><td>{a['samples_per_step']} × {a['max_steps']}</td>"
            + f"<td>{_fmt(a['beta'], 'g')}{'' if a['kl_target'] is None else ' → KL ' + format(a['kl_target'], 'g')}</td></tr>")
    run_rows = []
    for s in summaries:
        cls = "" if s["status"] == "complete" else "bad"
        status = (f"<span class='{'ok' if s['status'] == 'complete' else 'err'}'>{s['status']}</span>"
                  + (f"<div class='small'>{html.escape(s['error'])}</div>" if s["error"] else ""))
        run_rows.append(
            f"<tr class='{cls}' data-run='{html.escape(s['name'])}'><td class='l'>{html.escape(s['arm'])}</td>"
            f"<td>{s['seed']}</td><td class='l' data-status='{s['status']}'>{status}</td>"
            + "".join(_cell(s[k], spec) for k, _, spec in RUN_COLUMNS)
            + f"<td class='l small'>{html.escape(s['verdict'])}</td></tr>")
    diffs = plan.get("fairness_differences") or {}
    diff_html = ("<p class='err'>Settings that differ between algorithms: " + html.escape(json.dumps(diffs)) + "</p>"
                 if diffs else "<p class='small'>Same base checkpoint, prompts, rewards, held-out prompts and gold scorer "
                 "in every run (checked on the resolved configs).</p>")
    few = min((a["runs"] for a in arms), default=0) < 3
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(plan['name'])}: comparison report</title><style>{CSS}</style></head><body>
<h1>Comparison “{html.escape(plan['name'])}”</h1>
<p class="meta">{len(arms)} arms × {len(plan['seeds'])} seeds from <code>{html.escape(plan['base'])}</code>;
budget {html.escape(budget)} per run (x axis: <code>{x}</code>); W&amp;B project <code>{html.escape(plan['project'])}</code>,
group <code>{html.escape(plan['group'])}</code>, job_type = algorithm.</p>
{diff_html}
<h2>What the comparison found</h2>
<ul class="findings">{''.join(f'<li>{html.escape(line)}</li>' for line in found)}</ul>
{"<p class='err small'>Fewer than 3 seeds: the intervals are wide and only indicative.</p>" if few else ""}
<h2>Gold and RM score vs {unit}</h2>
{_image(figures['gold_and_rm_vs_samples.png'], 'gold and RM score') if figures else '<p>No metrics yet.</p>'}
<h2>Summary per algorithm</h2>
<table id="arms"><tr><th class="l">algorithm</th><th class="l">kind</th><th>seeds done</th><th>final gold</th><th>best gold</th>
<th>RM score</th><th>KL</th><th>{unit}</th><th>seconds</th><th>peak at ({unit})</th><th>collapsed</th>
<th>{unit}/step × steps</th><th>β</th></tr>{''.join(arm_rows)}</table>
<p class="small">Mean ± 95% Student-t half-width over the complete seeds (hover a cell for the per-seed values).
“collapsed”: seeds whose gold score fell ≥ {DROP} below its peak while the RM score rose (reward over-optimization).</p>
<h2>Every run</h2>
<table id="runs"><tr><th class="l">algorithm</th><th>seed</th><th class="l">status</th>
{''.join(f'<th>{h}</th>' for _, h, _ in RUN_COLUMNS)}<th class="l">gold score over training</th></tr>{''.join(run_rows)}</table>
<p class="small">Numbers from each run's metrics.jsonl: final = last logged value; peak at = {unit} of the best held-out gold
score; tokens/s is the mean of perf/tokens_per_s, peak GiB the max of perf/peak_rss_gb.</p>
<h2>Reward over-optimization and the KL frontier</h2>
{_image(figures['overoptimization_and_kl_frontier.png'], 'RM vs gold and KL frontier') if figures else ''}
<h2>Training reward and KL</h2>
{_image(figures['reward_and_kl_vs_samples.png'], 'reward and KL') if figures else ''}
<h2>Response length and entropy</h2>
{_image(figures['length_and_entropy.png'], 'length and entropy') if figures else ''}
<h2>Throughput and memory</h2>
{_image(figures['throughput_and_memory.png'], 'throughput and memory') if figures else ''}
<h2>Completions side by side</h2>
{_completions_html(out)}
<p class="small">Curves: mean over seeds with the min–max band. Generated by <code>rlhf compare</code>; the same runs are
in W&amp;B, group <code>{html.escape(plan['group'])}</code> (offline runs upload with
<code>find {html.escape(str(out))} -type d -name 'offline-run-*' -exec wandb sync {{}} +</code>).</p>
</body></html>"""
    path = out / "report.html"
    path.write_text(body, encoding="utf-8")
    return {"html": path, "runs": summaries, "arms": arms, "findings": found, "text": text}


def markdown_table(arms: list[dict]) -> str:
    """The per-algorithm summary as a markdown table (for the terminal and the README)."""
    head = ("| algorithm | seeds | final gold | best gold | peak at | RM score | KL | samples | seconds | collapsed |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]

    def num(v, spec):
        return "–" if v is None else format(v, spec)

    for a in arms:
        lines.append(
            f"| {a['arm']} | {a['complete']}/{a['runs']} | {_ci_text(a['final_gold'])} | {_ci_text(a['best_gold'])} | "
            f"{num(a['best_at']['mean'], '.0f')} | {_ci_text(a['final_rm'])} | {num(a['final_kl']['mean'], '.3f')} | "
            f"{num(a['samples']['mean'], '.0f')} | {num(a['seconds']['mean'], '.0f')} | {a['collapsed']}/{a['complete']} |")
    return "\n".join(lines)
