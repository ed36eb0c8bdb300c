"""What a kill, a full disk or a SIGTERM leaves is resumable; --overwrite never deletes the stage's own inputs.

A kill is played in-process by a KeyboardInterrupt in the training loss with the manifest put back to `running`
(what SIGKILL leaves), or for real in a subprocess; a full disk by writes that raise OSError(ENOSPC).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.pipeline import recipe, run_stage
from rlhf.stage import read_manifest, write_manifest
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "demo" / "tokenizer"
STEPS = 6


def _pretrain_cfg(tmp_path: Path, **overrides):
    data = tmp_path / "pretrain.jsonl"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("\n".join((ROOT / "data/demo/pretrain.jsonl").read_text().splitlines()[:120]) + "\n")
    base = {"output_dir": str(tmp_path / "out"), "model.scratch_size": "nano", "model.tokenizer": str(TOKENIZER),
            "data.train": str(data), "data.block_size": 16, "data.eval_fraction": 0.0, "train.max_steps": STEPS,
            "train.batch_size": 2, "train.log_every": 1, "train.save_every": 2, "tracking.mode": "disabled"}
    return load_config(recipe("pretrain").Config, None, {**base, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final metrics of an uninterrupted pretrain run (what every resumed run must reach)."""
    return run_stage("pretrain", _pretrain_cfg(tmp_path_factory.mktemp("reference")))["metrics"]


def _interrupted(cfg, monkeypatch, at_step: int = 5) -> Path:
    """Run `cfg` and stop it in the loss of optimizer step `at_step`, leaving what SIGKILL leaves: the manifest
    `running`, the checkpoints written so far."""
    from rlhf.recipes import pretrain

    real, calls = pretrain.lm_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "lm_loss", loss)
        with pytest.raises(KeyboardInterrupt):
            run_stage("pretrain", cfg)
    out = Path(cfg.output_dir)
    write_manifest(out, {**read_manifest(out), "status": "running"})
    return out


def _train_steps(out: Path) -> list[int]:
    return [row["step"] for row in read_metrics(out) if "train/grad_norm" in row]


def _leftovers(out: Path) -> list[str]:
    """Temporary files or directories anywhere in a stage directory."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".tmp*"))


# ---------------------------------------------------------------------------------------------------------------
# B. --overwrite never deletes the stage's own inputs


@pytest.mark.parametrize("kind, key", [("sft", "model.path"), ("dpo", "model.ref_path")])
def test_overwrite_refuses_an_output_dir_that_is_the_input_model(tmp_path, policy_dir, kind, key):
    # an earlier stage's complete artifact, then given as both this stage's input and its output_dir
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    write_manifest(model, {"tool": "rlhf", "stage": "pretrain", "kind": "pretrain", "fingerprint": "x",
                           "status": "complete"})
    overrides = {"output_dir": str(model), "model.path": str(policy_dir), key: str(model), "train.max_steps": 1,
                 "tracking.mode": "disabled"}
    with pytest.raises(UserError) as info:
        run_stage(kind, load_config(recipe(kind).Config, None, overrides), overwrite=True)
    assert f"is this stage's input {key}=" in str(info.value) and "\n" not in str(info.value)
    assert (model / "model.safetensors").read_bytes() == b"weights", "the input model must survive"


def test_overwrite_refuses_an_output_dir_that_holds_the_training_pairs(tmp_path, policy_dir):
    # the reward stage's own directory holds the pairs it sampled; training on them there must not delete them
    out = tmp_path / "reward"
    out.mkdir()
    pairs = out / "preferences.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    write_manifest(out, {"tool": "rlhf", "stage": "reward", "kind": "reward", "fingerprint": "old", "status": "complete"})
    overrides = {"output_dir": str(out), "model.path": str(policy_dir), "data.train": str(pairs),
                 "tracking.mode": "disabled"}
    with pytest.raises(UserError, match=r"holds this stage's input data\.train=.*choose another output_dir"):
        run_stage("reward", load_config(recipe("reward").Config, None, overrides), overwrite=True)
    assert pairs.is_file(), "the pairs must survive"


# ---------------------------------------------------------------------------------------------------------------
# C. Resume survives what a kill or a full disk leaves


def test_a_cut_off_last_line_in_metrics_jsonl_is_dropped_on_resume(tmp_path, monkeypatch, reference):
    cfg = _pretrain_cfg(tmp_path)
    out = _interrupted(cfg, monkeypatch)
    with (out / "metrics.jsonl").open("a") as fh:  # the kill came while a row was being appended
        fh.write('{"step": 5, "loss/total": 6.2')
    result = run_stage("pretrain", cfg)
    assert result["metrics"] == pytest.approx(reference, rel=1e-6)
    assert _train_steps(out) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("damage", ["optimizer.bin cut", "state.json missing", "state.json empty"])
def test_resume_falls_back_past_a_checkpoint_a_kill_or_full_disk_damaged(tmp_path, monkeypatch, capsys, reference,
                                                                         damage):
    cfg = _pretrain_cfg(tmp_path, **{"train.keep_checkpoints": 2})
    out = _interrupted(cfg, monkeypatch)
    newest = out / "checkpoints" / "step-000004"
    assert newest.is_dir() and (out / "checkpoints" / "step-000002").is_dir()
    if damage == "optimizer.bin cut":
        data = (newest / "optimizer.bin").read_bytes()
        (newest / "optimizer.bin").write_bytes(data[: len(data) // 2])
    elif damage == "state.json missing":
        (newest / "state.json").unlink()
    else:
        (newest / "state.json").write_text("")
    capsys.readouterr()
    result = run_stage("pretrain", cfg)
    printed = capsys.readouterr().out
    assert "step-000004 cannot be resumed from" in printed and "resuming pretrain from step-000002" in printed
    assert result["metrics"] == pytest.approx(reference, rel=1e-6)
    assert _train_steps(out) == list(range(1, STEPS + 1)), "each step logged once, the replayed ones included"


def test_no_usable_checkpoint_names_what_to_remove_and_overwrite_starts_over(tmp_path, monkeypatch, reference):
    cfg = _pretrain_cfg(tmp_path)
    out = _interrupted(cfg, monkeypatch)
    optimizer = out / "checkpoints" / "step-000004" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    with pytest.raises(UserError) as info:
        run_stage("pretrain", cfg)
    message = str(info.value)
    assert "\n" not in message and "optimizer.bin is truncated" in message
    assert f"remove {out / 'checkpoints'}" in message and "--overwrite to start over" in message
    result = run_stage("pretrain", cfg, overwrite=True)
    assert result["status"] == "ran" and result["metrics"] == pytest.approx(reference, rel=1e-6)
    assert _train_steps(out) == list(range(1, STEPS + 1))


def test_a_full_disk_while_rewriting_metrics_on_resume_keeps_the_old_rows(tmp_path, monkeypatch, reference):
    # state files are replaced whole: the write that fails leaves the old file, not an emptied one
    cfg = _pretrain_cfg(tmp_path)
    out = _interrupted(cfg, monkeypatch)
    before = (out / "metrics.jsonl").read_text()
    real = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if "metrics.jsonl" in self.name:
            with open(self, "w") as fh:
                fh.write(data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full_disk)
        with pytest.raises(UserError, match="disk is full") as info:
            run_stage("pretrain", cfg)
    assert "\n" not in str(info.value)
    assert (out / "metrics.jsonl").read_text() == before
    assert _leftovers(out) == []
    assert run_stage("pretrain", cfg)["metrics"] == pytest.approx(reference, rel=1e-6)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_removes_the_temporary(tmp_path, monkeypatch, reference):
    cfg = _pretrain_cfg(tmp_path)
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step-000004" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        with pytest.raises(UserError) as info:
            run_stage("pretrain", cfg)
    message = str(info.value)
    assert "\n" not in message and "disk is full (No space left on device" in message and "step-000002" in message
    out = Path(cfg.output_dir)
    assert _leftovers(out) == [], "the half-written checkpoint directory is removed"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert read_manifest(out)["status"] == "failed"
    assert run_stage("pretrain", cfg)["metrics"] == pytest.approx(reference, rel=1e-6)
    assert _train_steps(out) == list(range(1, STEPS + 1))


def test_a_full_disk_during_the_final_save_is_one_line_and_leaves_no_half_model(tmp_path, monkeypatch, reference):
    from rlhf.policy import PolicyModel

    cfg = _pretrain_cfg(tmp_path)

    def full_disk(self, path, **kwargs):  # as safetensors writes: a temporary beside the file, then a rename
        (Path(path) / ".tmpAbC123").write_bytes(b"half of the weights")
        (Path(path) / "config.json").write_text("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(PolicyModel, "save", full_disk)
        with pytest.raises(UserError, match="disk is full") as info:
            run_stage("pretrain", cfg)
    assert "\n" not in str(info.value)
    out = Path(cfg.output_dir)
    assert _leftovers(out) == [] and not (out / "config.json").exists(), "nothing half-written stays"
    assert (out / "checkpoints" / "step-000004").is_dir()
    assert run_stage("pretrain", cfg)["metrics"] == pytest.approx(reference, rel=1e-6)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Review pairs of 6 prompts, in the reward stage's format."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    good = [" the phone is excellent .", " the screen is nice . i love it .", " it works perfectly ."]
    bad = [" the phone is terrible .", " it broke after a day .", " the case is poor ."]
    rows = [{"prompt": f"<review> product: {product}", "chosen": good[j], "rejected": bad[(i + j) % 3], "task": "review"}
            for i, product in enumerate(["red phone", "blue kettle", "green jacket", "navy lamp", "gray chair", "teal mug"])
            for j in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dpo_overrides(policy_dir: Path, pairs_file: Path, out: Path) -> dict:
    return {"output_dir": str(out), "model.path": str(policy_dir), "data.train": str(pairs_file),
            "data.eval_fraction": 0.34, "train.max_steps": 4, "train.batch_size": 4, "train.save_every": 2,
            "train.log_every": 1, "optim.lr": 1e-2, "precompute_ref": True, "eval.gold_prompts": None,
            "tracking.mode": "disabled"}


def test_a_truncated_dpo_reference_file_is_computed_again(tmp_path, monkeypatch, capsys, policy_dir, pairs_file):
    from rlhf.recipes import dpo

    reference = run_stage("dpo", load_config(dpo.Config, None, _dpo_overrides(policy_dir, pairs_file, tmp_path / "ref")))
    cfg = load_config(dpo.Config, None, _dpo_overrides(policy_dir, pairs_file, tmp_path / "out"))
    real, calls = dpo._pair_loss, []

    def loss(*args, **kwargs):  # stopped in step 3, after the checkpoint of step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(dpo, "_pair_loss", loss)
        with pytest.raises(KeyboardInterrupt):
            run_stage("dpo", cfg)
    out = tmp_path / "out"
    write_manifest(out, {**read_manifest(out), "status": "running"})
    saved = out / dpo.REF_LOGPS_FILE
    saved.write_bytes(saved.read_bytes()[:100])  # what a kill during a plain torch.save left
    capsys.readouterr()
    result = run_stage("dpo", cfg)
    printed = capsys.readouterr().out
    assert "ref_logps.pt is unreadable" in printed and "resuming dpo from step-000002" in printed
    assert result["metrics"] == pytest.approx(reference["metrics"], rel=1e-5, abs=1e-6)
    assert torch.load(saved, weights_only=True).keys() == {"train", "eval"}


def _rlhf(*args: str, code: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "rlhf.cli", *args]
    return subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


# SIGKILL in the middle of the final save, at the point where peft has opened adapter_config.json and safetensors
# is writing its temporary weights file
KILLED_IN_SAVE = """
import os, signal, sys
from pathlib import Path
from rlhf.policy import PolicyModel
def save(self, path, **kwargs):
    (Path(path) / "adapter_config.json").write_text("")
    (Path(path) / ".tmpXyZ123").write_bytes(b"half of the weights")
    os.kill(os.getpid(), signal.SIGKILL)
PolicyModel.save = save
from rlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_the_final_save_leaves_no_stray_or_empty_file(tmp_path, policy_dir, pairs_file):
    from rlhf.recipes import dpo

    overrides = {**_dpo_overrides(policy_dir, pairs_file, tmp_path / "out"), "model.lora": {"r": 4, "alpha": 8}}
    args = ["dpo", *(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items())]
    killed = _rlhf(*args, code=KILLED_IN_SAVE)
    text, _ = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, text
    out = tmp_path / "out"
    assert read_manifest(out)["status"] == "running"
    assert not [p.name for p in out.iterdir() if p.is_file() and (p.name.startswith(".tmp") or not p.stat().st_size)]
    run_stage("dpo", load_config(dpo.Config, None, overrides))
    assert read_manifest(out)["status"] == "complete"
    assert _leftovers(out) == []
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_sigterm_stops_like_ctrl_c_resumable_and_exits_143(tmp_path):
    steps = 300
    cfg = _pretrain_cfg(tmp_path, **{"train.max_steps": steps})
    args = ["pretrain", f"output_dir={cfg.output_dir}", "model.scratch_size=nano", f"model.tokenizer={TOKENIZER}",
            f"data.train={cfg.data.train}", "data.block_size=16", "data.eval_fraction=0", f"train.max_steps={steps}",
            "train.batch_size=2", "train.log_every=1", "train.save_every=2", "tracking.mode=disabled"]
    out = Path(cfg.output_dir)
    proc = _rlhf(*args)
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, text
    assert "terminated (SIGTERM): rerun the same command to resume" in text and "Traceback" not in text
    assert read_manifest(out)["status"] == "failed", "the manifest is not left `running`"
    resumed = _rlhf(*args)
    text, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming pretrain from step-" in text, text
    assert _train_steps(out) == list(range(1, steps + 1))
