"""The tiny comparison end to end: equal budgets, offline W&B runs on the shared axes, a report whose numbers are those
of metrics.jsonl, failed and missing runs listed, and a rerun that skips what is complete."""

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import comparison_config, write_config
from rlhf.compare.report import load_runs, write_report
from rlhf.compare.runner import run_comparison
from rlhf.stage import read_manifest, write_manifest
from rlhf.tracking import read_metrics


def _plan(out: Path) -> dict:
    return json.loads((out / "runs.json").read_text())


def test_every_run_completes_on_the_same_budget(tiny_comparison):
    _, out, result = tiny_comparison
    assert result["failed"] == [] and set(result["runs"].values()) == {"complete"}
    runs = _plan(out)["runs"]
    assert len(runs) == 4
    for run in runs:
        rows = read_metrics(run["dir"])
        assert rows[-1]["progress/samples"] == 32 == run["samples_per_step"] * run["max_steps"]
        evals = [r["progress/samples"] for r in rows if "eval/gold_score" in r]
        assert sorted(set(evals)) == [16, 32]  # the same eval grid for 8 and 16 samples a step
        assert all("eval/rm_score" in r for r in rows if "eval/gold_score" in r)
        manifest = read_manifest(run["dir"])
        assert manifest["status"] == "complete" and manifest["kind"] == "grpo" and manifest["stage"] == run["name"]
    assert {r["algorithm"]: r["max_steps"] for r in runs} == {"grpo": 4, "rloo": 2}
    assert json.loads((out / "base_eval.json").read_text())["metrics"]["eval/gold_score"] >= 0
    completions = json.loads((out / "completions.json").read_text())
    assert [c["arm"] for c in completions["columns"]] == ["base (SFT)", "grpo", "rloo"]
    assert all(len(c["rows"]) == len(completions["prompts"]) == 2 for c in completions["columns"])


def _inspect(run_dir: str, *flags: str):
    (wandb_dir,) = (Path(run_dir) / "wandb").glob("offline-run-*")
    out = subprocess.run(["wandb", "leet", "inspect", *flags, "--json", str(wandb_dir)], capture_output=True, text=True,
                         check=True).stdout
    return out


def test_offline_wandb_runs_hold_the_metrics_on_the_shared_axes(tiny_comparison):
    _, out, _ = tiny_comparison
    for run in _plan(out)["runs"]:
        records = [json.loads(line) for line in _inspect(run["dir"]).splitlines() if line.startswith("{")]
        meta = next(r["run"] for r in records if r["type"] == "run")
        assert (meta["job_type"], meta["run_group"], meta["project"]) == (run["algorithm"], "tiny", "rlhf-test")
        assert meta["display_name"] == f"tiny/{run['name']}"
        bound = [r["metric"] for r in records if r["type"] == "metric"]
        assert {"glob_name": "*", "step_metric": "progress/samples"}.items() <= next(m for m in bound if m.get("glob_name")).items()
        assert {m["name"] for m in bound if "name" in m} >= {"progress/samples", "progress/tokens", "progress/seconds"}
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        logged = read_metrics(run["dir"])
        # W&B merges what is logged at one step into one history row (the last value wins), as dict() does here
        on_axis = {h["progress/samples"]: (h["eval/gold_score"], h["eval/rm_score"]) for h in history if "eval/gold_score" in h}
        assert on_axis == {r["progress/samples"]: (r["eval/gold_score"], r["eval/rm_score"]) for r in logged
                           if "eval/gold_score" in r}
        assert sorted(on_axis) == [16, 32]
        assert all({"progress/samples", "progress/tokens", "progress/seconds", "train/reward"} <= set(h)
                   for h in history if "train/reward" in h)
        summary = json.loads(_inspect(run["dir"], "--summary"))
        config = summary["config"]
        assert summary["state"] == "finished"
        assert (config["algorithm"], config["seed"], config["beta"], config["budget"]) == (
            run["algorithm"], run["seed"], 0.04, {"samples": 32})


def _expected_row(run_dir: str) -> dict:
    """The per-run numbers, computed here straight from metrics.jsonl."""
    rows = read_metrics(run_dir)
    golds = [(r["progress/samples"], r["eval/gold_score"]) for r in rows if "eval/gold_score" in r]
    best = max(golds, key=lambda p: p[1])
    last = {}
    for r in rows:
        last.update(r)
    rss = [r["perf/peak_rss_gb"] for r in rows if "perf/peak_rss_gb" in r]
    tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
    return {"final_gold": golds[-1][1], "best_gold": best[1], "best_at": best[0], "final_rm": last["eval/rm_score"],
            "final_reward": last["train/reward"], "final_kl": last["train/kl"], "samples": last["progress/samples"],
            "tokens": last["progress/tokens"], "seconds": last["progress/seconds"], "peak_rss_gb": max(rss),
            "tokens_per_s": sum(tps) / len(tps)}


def test_report_numbers_are_those_of_metrics_jsonl(tiny_comparison):
    _, out, result = tiny_comparison
    by_name = {r["name"]: r for r in result_rows(out)}
    for run in _plan(out)["runs"]:
        expected = _expected_row(run["dir"])
        got = by_name[run["name"]]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12), (run["name"], key)
    html = Path(result["report"]).read_text()
    assert "http://" not in html.replace("http-equiv", "") and "https://" not in html  # nothing to fetch
    assert html.count("data:image/png;base64,") == 5 and all((out / "report" / f).is_file() for f in (
        "gold_and_rm_vs_samples.png", "overoptimization_and_kl_frontier.png", "throughput_and_memory.png"))


def result_rows(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["runs"]


def test_failed_and_missing_runs_are_reported(tmp_path, compare_inputs):
    algorithms = {"grpo": {"kind": "grpo", "overrides": {"rl.prompts_per_step": 2, "sampling.n": 4}},
                  "broken": {"kind": "grpo", "overrides": {"rl.prompts_per_step": 2, "sampling.n": 4,
                                                           "data.prompts": str(tmp_path / "no-such-prompts.jsonl")}}}
    cfg = comparison_config(compare_inputs, tmp_path / "out", seeds=[0], budget={"samples": 8}, algorithms=algorithms,
                            tracking={"mode": "disabled"}, eval={"every_samples": 8, "completions": 0},
                            isolate=False)  # in-process: the other path (the tiny comparison runs isolated)
    result = run_comparison(write_config(tmp_path / "c.yaml", cfg))
    assert result["runs"] == {"grpo-seed0": "complete", "broken-seed0": "failed"}
    assert result["failed"] == ["broken-seed0"]
    # one more seed in the config, not run yet: listed as missing, never dropped
    cfg["seeds"] = [0, 1]
    result = run_comparison(write_config(tmp_path / "c.yaml", cfg), report_only=True)
    assert result["runs"] == {"grpo-seed0": "complete", "broken-seed0": "failed", "grpo-seed1": "missing",
                              "broken-seed1": "missing"}
    rows = {r["name"]: r for r in result_rows(tmp_path / "out")}
    assert "no-such-prompts.jsonl" in rows["broken-seed0"]["error"]
    html = Path(result["report"]).read_text()
    for name, status in result["runs"].items():
        assert f"data-run='{name}'" in html and f"data-status='{status}'" in html
    arms = json.loads((tmp_path / "out" / "summary.json").read_text())["arms"]
    assert [(a["arm"], a["complete"], a["runs"]) for a in arms] == [("grpo", 1, 2), ("broken", 0, 2)]
    assert any("broken: no complete run" in line for line in result_findings(tmp_path / "out"))


def result_findings(out: Path) -> list[str]:
    return json.loads((out / "summary.json").read_text())["findings"]


def test_rerun_skips_complete_runs_and_redoes_an_interrupted_one(tiny_comparison, capsys):
    path, out, _ = tiny_comparison
    victim = _plan(out)["runs"][1]
    manifest = read_manifest(victim["dir"])
    write_manifest(victim["dir"], {**manifest, "status": "running"})  # as if killed mid-run
    _, runs = load_runs(out)
    assert {r.name: r.status for r in runs}[victim["name"]] == "interrupted"
    assert write_report(out)["runs"][1]["status"] == "interrupted"
    from rlhf.cli import main

    capsys.readouterr()
    assert main(["compare", path]) == 0
    printed = capsys.readouterr().out
    outcomes = {r["name"]: r["outcome"]["action"] for r in _plan(out)["runs"]}
    assert outcomes == {"grpo-seed0": "skipped", victim["name"]: "ran", "grpo-seed1": "skipped", "rloo-seed1": "skipped"}
    assert "| grpo | 2/2 |" in printed and "report: " in printed

