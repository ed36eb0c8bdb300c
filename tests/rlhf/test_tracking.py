"""A stage's offline W&B run reads back (`wandb leet inspect --json`) with the metrics metrics.jsonl holds."""

import json
import subprocess
from pathlib import Path

from rlhf.config import load_config
from rlhf.pipeline import run_stage
from rlhf.recipes import pretrain
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_offline_wandb_run_reads_back(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the kettle is great . {i}+{i}={2 * i}"}) + "\n" for i in range(60)))
    cfg = load_config(pretrain.Config, None, {
        "output_dir": str(tmp_path / "stage"), "model.scratch_size": "nano",
        "model.tokenizer": str(ROOT / "data" / "demo" / "tokenizer"), "data.train": str(corpus), "data.block_size": 16,
        "train.max_steps": 3, "train.batch_size": 2, "train.log_every": 1,
        "tracking.mode": "offline", "tracking.project": "rlhf-test", "tracking.group": "g1",
    })
    run_stage("pretrain", cfg)
    (run_dir,) = (tmp_path / "stage" / "wandb").glob("offline-run-*")

    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["job_type"], run["project"], run["run_group"]) == ("pretrain", "rlhf-test", "g1")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged = [row for row in read_metrics(tmp_path / "stage") if "train/lr" in row]
    train_rows = [h for h in history if "train/lr" in h]
    assert [h["loss/total"] for h in train_rows] == [row["loss/total"] for row in logged]
    assert all("progress/samples" in h and "perf/tokens_per_s" in h for h in train_rows)

    summary = json.loads(subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
                                        capture_output=True, text=True, check=True).stdout)
    assert summary["state"] == "finished" and "eval/loss" in summary["summary"]
    assert summary["config"]["train"]["max_steps"] == 3
