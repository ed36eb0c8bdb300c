"""The staged runner: skip, rerun on change, --from / --only, resume after SIGKILL, clear errors from the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf.pipeline import run_pipeline
from rlhf.stage import read_manifest
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def world(tmp_path):
    """A small copy of the demo data and a three-stage pipeline on the 'nano' model."""
    data = ROOT / "data" / "demo"
    small = tmp_path / "data"
    small.mkdir()
    for name, n in (("pretrain.jsonl", 300), ("sft.jsonl", 200), ("eval_prompts.jsonl", 8)):
        lines = (data / name).read_text().splitlines()
        step = max(1, len(lines) // n)
        (small / name).write_text("\n".join(lines[::step][:n]) + "\n")
    pipeline = {
        "name": "test", "output_dir": str(tmp_path / "runs"), "seed": 0, "tracking": {"mode": "disabled"},
        "stages": [
            {"name": "pretrain", "kind": "pretrain", "overrides": {
                "model.scratch_size": "nano", "model.tokenizer": str(data / "tokenizer"),
                "data.train": str(small / "pretrain.jsonl"), "data.block_size": 32,
                "train.max_steps": 6, "train.batch_size": 4, "train.save_every": 2, "train.log_every": 1}},
            {"name": "sft", "kind": "sft", "inputs": {"model.path": "pretrain"}, "overrides": {
                "action_tokens": ["<add>", "<review>"], "data.train": str(small / "sft.jsonl"),
                "data.gold_prompts": str(small / "eval_prompts.jsonl"), "data.max_length": 48,
                "generation.max_new_tokens": 8, "train.max_steps": 6, "train.batch_size": 4, "train.grad_accum": 2,
                "train.save_every": 2, "train.log_every": 1}},
            {"name": "eval", "kind": "eval", "inputs": {"models.base": "pretrain", "models.sft": "sft"},
             "overrides": {"prompts": str(small / "eval_prompts.jsonl"), "generation.max_new_tokens": 8}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path, tmp_path / "runs"


def test_pipeline_runs_skips_and_reruns_what_changed(world, capsys):
    path, runs = world
    first = run_pipeline(path, [])
    assert [r["status"] for r in first.values()] == ["ran", "ran", "ran"]
    for stage in ("pretrain", "sft"):
        m = read_manifest(runs / stage)
        assert m["status"] == "complete" and (runs / stage / "model.safetensors").is_file()
        assert (runs / stage / "config.yaml").is_file() and read_metrics(runs / stage)
        assert not (runs / stage / "checkpoints").exists(), "a complete stage drops its resumable state"
    assert set(first["eval"]["metrics"]) >= {"eval/base/gold_score/add", "eval/sft/gold_score/review"}

    second = run_pipeline(path, [])
    assert [r["status"] for r in second.values()] == ["skipped"] * 3
    assert "unchanged config: skipped" in capsys.readouterr().out

    # the same pipeline moved to another directory is the same pipeline: copied stages are recognised
    import shutil

    shutil.copytree(runs, runs.parent / "moved")
    moved = run_pipeline(path, [f"output_dir={runs.parent / 'moved'}"])
    assert [r["status"] for r in moved.values()] == ["skipped"] * 3

    changed = run_pipeline(path, ["sft.optim.lr=0.0005"])
    assert [r["status"] for r in changed.values()] == ["skipped", "ran", "ran"]

    assert [r["status"] for r in run_pipeline(path, ["sft.optim.lr=0.0005"], from_stage="sft").values()] == ["skipped", "ran", "ran"]
    assert run_pipeline(path, ["sft.optim.lr=0.0005"], only="eval")["eval"]["status"] == "skipped"
    only = run_pipeline(path, ["sft.optim.lr=0.0005"], only="eval", from_stage="eval")
    assert list(only) == ["eval"] and only["eval"]["status"] == "ran"


def _rlhf(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigkill_mid_stage_resumes_to_the_same_final_metrics(world, tmp_path):
    path, runs = world
    # reference: one uninterrupted run
    ref = _rlhf("run", str(path), f"output_dir={tmp_path / 'ref'}", "--only", "pretrain", "pretrain.train.max_steps=40")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    reference = read_manifest(tmp_path / "ref" / "pretrain")["metrics"]

    proc = _rlhf("run", str(path), "--only", "pretrain", "pretrain.train.max_steps=40")
    checkpoints = runs / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(checkpoints.glob("step-*")), "no checkpoint appeared before the run ended"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = read_manifest(runs / "pretrain")
    assert killed["status"] == "running", "a killed stage must not look complete"

    resumed = _rlhf("run", str(path), "--only", "pretrain", "pretrain.train.max_steps=40")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming pretrain from step-" in out
    final = read_manifest(runs / "pretrain")
    assert final["status"] == "complete"
    assert final["metrics"] == pytest.approx(reference, rel=1e-6, abs=1e-7)
    steps = [row["step"] for row in read_metrics(runs / "pretrain") if "train/lr" in row]
    assert steps == sorted(set(steps)), "metrics.jsonl reads as one uninterrupted run"


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    return proc.returncode, proc.stderr.strip()


def test_cli_bad_input_exits_2_with_one_readable_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\nnot json\n')
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's files")
    cases = [
        (["sft", "train.max_stpes=3"], "unknown config key 'train.max_stpes' (did you mean 'train.max_steps'?)"),
        (["sft", "train.max_steps=lots"], "config key 'train.max_steps'"),
        (["sft", f"model.path={tmp_path / 'missing-model'}", f"output_dir={tmp_path / 'o1'}"], "model path not found"),
        (["pretrain", f"data.train={bad}", "model.scratch_size=nano", f"output_dir={tmp_path / 'o2'}", "tracking.mode=disabled"],
         f"{bad}:2: malformed JSON"),
        (["pretrain", f"output_dir={foreign}", "tracking.mode=disabled"], "holds files that rlhf did not write"),
        (["run", "configs/demo/pipeline.yaml", "--from", "sfft"], "did you mean 'sft'"),
    ]
    for args, expected in cases:
        code, err = _cli(*args)
        assert code == 2, (args, err)
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
    code, err = _cli("--debug", "sft", "train.max_stpes=3")
    assert code != 2 and "Traceback" in err


def test_incomplete_artifact_of_another_config_is_not_overwritten(tmp_path):
    from rlhf.stage import claim
    from rlhf.errors import UserError

    out = tmp_path / "stage"
    assert claim(out, stage="sft", kind="sft", fingerprint="aaa") == "fresh"
    assert claim(out, stage="sft", kind="sft", fingerprint="aaa") == "resume"
    with pytest.raises(UserError, match="holds an incomplete 'sft' artifact made with a different config"):
        claim(out, stage="sft", kind="sft", fingerprint="bbb")
    assert claim(out, stage="sft", kind="sft", fingerprint="bbb", overwrite=True) == "fresh"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == "bbb" and manifest["status"] == "running"
