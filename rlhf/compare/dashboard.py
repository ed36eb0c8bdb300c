"""The comparison's W&B report: one saved report with the main panels over the comparison's group.

`report_spec` is a plain dict (always written to `<output_dir>/wandb_report.json`, tested offline);
`build_report` turns it into a `wandb_workspaces` Report object without any network call; `publish` saves it only
when tracking is online (a W&B key is set), which the tests never do. Every panel plots against the shared x axis
(`progress/samples`, or `progress/tokens` with a token budget) and groups runs by the `arm` config key (the
algorithm, plus the sweep value), averaging seeds with a min–max band.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.compare.config import CompareConfig
from rlhf.tracking import resolve_mode

SPEC_FILE = "wandb_report.json"

# (title, kind, y metrics or (x, y) for scatter plots)
PANELS: list[tuple[str, str, Any]] = [
    ("Held-out gold score", "line", ["eval/gold_score"]),
    ("Held-out RM score (same completions)", "line", ["eval/rm_score"]),
    ("Training reward", "line", ["train/reward"]),
    ("KL to the reference", "line", ["train/kl"]),
    ("Over-optimization: RM score vs gold score", "scatter", ("eval/rm_score", "eval/gold_score")),
    ("KL–reward frontier", "scatter", ("train/kl", "train/reward")),
    ("Response length", "line", ["train/response_length"]),
    ("Entropy", "line", ["train/entropy"]),
    ("Throughput (tokens/s)", "line", ["perf/tokens_per_s"]),
    ("Peak memory (GiB)", "line", ["perf/peak_rss_gb"]),
]


def report_spec(cfg: CompareConfig, entity: str | None = None) -> dict[str, Any]:
    """The report as plain data: title, where its runs are, how they are grouped, and its panels."""
    group = cfg.tracking.group or cfg.name
    x = "progress/tokens" if cfg.budget.unit == "tokens" else "progress/samples"
    panels = []
    for title, kind, metrics in PANELS:
        if kind == "line":
            panels.append({"type": "line", "title": title, "x": x, "y": list(metrics), "groupby_aggfunc": "mean",
                           "groupby_rangefunc": "minmax"})
        else:
            panels.append({"type": "scatter", "title": title, "x": metrics[0], "y": metrics[1]})
    return {
        "title": f"rlhf compare: {cfg.name}",
        "description": (f"{', '.join(cfg.algorithms)} × seeds {cfg.seeds} from {cfg.base}, "
                        f"{cfg.budget.amount} {cfg.budget.unit} per run"),
        "entity": entity, "project": cfg.tracking.project, "group": group,
        "runset": {"name": cfg.name, "filters": f"Group = '{group}'", "groupby": ["config.arm"]},
        "x": x, "panels": panels,
    }


def build_report(spec: dict[str, Any]):
    """A `wandb_workspaces.reports.v2.Report` for the spec (no network call until `.save()`)."""
    import wandb_workspaces.reports.v2 as wr

    entity = spec["entity"] or "offline"
    runset = wr.Runset(entity=spec["entity"] or "", project=spec["project"] if spec["entity"] else "",
                       name=spec["runset"]["name"], filters=spec["runset"]["filters"], groupby=spec["runset"]["groupby"])
    panels = []
    for p in spec["panels"]:
        if p["type"] == "line":
            panels.append(wr.LinePlot(title=p["title"], x=p["x"], y=p["y"], groupby_aggfunc=p["groupby_aggfunc"],
                                      groupby_rangefunc=p["groupby_rangefunc"]))
        else:
            panels.append(wr.ScatterPlot(title=p["title"], x=p["x"], y=p["y"]))
    return wr.Report(project=spec["project"], entity=entity, title=spec["title"], description=spec["description"],
                     width="fluid", blocks=[
                         wr.H1(spec["title"]),
                         wr.P(spec["description"]),
                         wr.PanelGrid(runsets=[runset], panels=panels),
                     ])


def publish(cfg: CompareConfig, runs=None) -> str | None:
    """Write the spec; when tracking is online, also save the report to W&B and return its URL."""
    out = Path(cfg.output_dir) / SPEC_FILE
    online = resolve_mode(cfg.tracking.mode) == "online"
    entity = None
    if online:
        try:
            import wandb

            entity = wandb.Api().default_entity
        except Exception as exc:  # no network, bad key: the local report is still there
            print(f"[compare] W&B report not saved ({type(exc).__name__}: {exc})")
            online = False
    spec = report_spec(cfg, entity)
    out.write_text(json.dumps(spec, indent=1))
    if not online:
        return None
    try:
        report = build_report(spec)
        report.save()
        print(f"[compare] W&B report: {report.url}")
        return report.url
    except Exception as exc:
        print(f"[compare] W&B report not saved ({type(exc).__name__}: {exc}); its spec is in {out}")
        return None
