"""Training that cannot lie, and bad input that exits 2 with one line: non-finite training stops as `failed`,
mistaken config values are refused by the schema, stage names / output directories / model directories / text
encodings / SFT rows are checked, and a pipeline validates every stage before running any and ends with a summary."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf.config import ModelSettings, load_config, parse_overrides, read_yaml
from rlhf.data import Record, load_records, sft_texts
from rlhf.errors import UserError
from rlhf.pipeline import format_summary, load_pipeline, run_pipeline, run_stage
from rlhf.stage import claim, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "demo" / "tokenizer"


def _pretrain_data(tmp_path: Path, n: int = 120) -> Path:
    lines = (ROOT / "data" / "demo" / "pretrain.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "pretrain.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pretrain_cfg(tmp_path: Path, **overrides):
    from rlhf.recipes import pretrain

    base = {"output_dir": str(tmp_path / "out"), "model.scratch_size": "nano", "model.tokenizer": str(TOKENIZER),
            "data.train": str(_pretrain_data(tmp_path)), "data.block_size": 16, "data.eval_fraction": 0.0,
            "train.max_steps": 6, "train.batch_size": 2, "train.log_every": 1, "tracking.mode": "disabled"}
    return load_config(pretrain.Config, None, {**base, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# C1. A non-finite loss or gradient stops the stage as `failed`; a stalled one warns


def test_non_finite_loss_fails_the_stage_keeps_the_checkpoint_and_writes_no_model(tmp_path, monkeypatch):
    from rlhf.recipes import pretrain
    from rlhf.training import NonFiniteError

    real, calls = pretrain.lm_loss, []

    def poisoned(*args, **kwargs):  # the 4th training step's loss is NaN
        calls.append(1)
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 4 else loss), stats

    monkeypatch.setattr(pretrain, "lm_loss", poisoned)
    with pytest.raises(NonFiniteError) as info:
        run_stage("pretrain", _pretrain_cfg(tmp_path, **{"train.save_every": 2}))
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "non-finite loss nan" in message and "optimizer step 4" in message and "step-000002" in message
    out = tmp_path / "out"
    assert read_manifest(out)["status"] == "failed"
    assert not (out / "model.safetensors").exists(), "no final model from a diverged run"
    ckpt = out / "checkpoints" / "step-000002"
    assert ckpt.is_dir(), "the last good checkpoint stays"
    weights = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def _tiny_step(model, optimizer, scheduler, accelerator, grad: float, **kwargs) -> float:
    from rlhf.training import optimizer_step

    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    return optimizer_step(accelerator, model, optimizer, scheduler, 1.0, **kwargs)


@pytest.fixture()
def tiny_opt():
    from accelerate import Accelerator

    from rlhf.config import OptimSettings
    from rlhf.training import make_optimizer, make_scheduler

    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model.parameters(), OptimSettings())
    return model, optimizer, make_scheduler(optimizer, OptimSettings(), 100), Accelerator(cpu=True)


def test_non_finite_gradient_is_never_stepped(tiny_opt):
    from rlhf.training import NonFiniteError

    model, optimizer, scheduler, accelerator = tiny_opt
    _tiny_step(model, optimizer, scheduler, accelerator, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm (nan|inf) at optimizer step 2"):
        _tiny_step(model, optimizer, scheduler, accelerator, float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite loss inf"):
        _tiny_step(model, optimizer, scheduler, accelerator, 0.1, loss=float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_zero_gradient_norm_for_many_steps_warns_once_and_never_fails(tiny_opt, caplog):
    from rlhf.training import ZERO_GRAD_WARN_STEPS

    model, optimizer, scheduler, accelerator = tiny_opt
    with caplog.at_level(logging.WARNING, logger="rlhf.training"):
        norms = [_tiny_step(model, optimizer, scheduler, accelerator, 0.0, loss=0.0) for _ in range(ZERO_GRAD_WARN_STEPS + 5)]
    assert norms == [0.0] * len(norms)
    warnings = [r for r in caplog.records if "exactly 0" in r.getMessage()]
    assert len(warnings) == 1 and f"{ZERO_GRAD_WARN_STEPS} optimizer steps" in warnings[0].getMessage()


# ---------------------------------------------------------------------------------------------------------------
# C2. Config values that can only be mistakes are refused with the key named


@pytest.mark.parametrize("override, key", [
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.betas=[0.9, 1.0]", "optim.betas.1"),
    ("optim.betas=[-0.1, 0.9]", "optim.betas.0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.warmup_steps=-5", "optim.warmup_steps"),
    ("train.max_steps=true", "train.max_steps"),
    ("optim.lr=true", "optim.lr"),
    ("data.gold_limit=-1", "data.gold_limit"),
    ("model.lora={r: 0}", "model.lora.r"),
    ("model.lora={dropout: 1.0}", "model.lora.dropout"),
    ("train=5", "train"),
])
def test_mistaken_config_values_are_refused_with_the_key_named(override, key):
    from rlhf.recipes import sft

    with pytest.raises(UserError, match=rf"config key '{key}'") as info:
        load_config(sft.Config, None, parse_overrides([override]))
    assert "\n" not in str(info.value)


def test_a_section_given_a_scalar_says_it_is_a_section(tmp_path):
    from rlhf.recipes import sft

    path = tmp_path / "c.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(UserError, match=r"config key 'train' is a section: give it a mapping of keys such as 'train\."):
        load_config(sft.Config, path)
    assert load_config(sft.Config, None, parse_overrides(["optim.max_grad_norm=null"])).optim.max_grad_norm is None


def test_a_lora_target_module_the_model_lacks_names_the_ones_it_has(nano_model_dir):
    from rlhf.policy import PolicyModel

    settings = ModelSettings(path=str(nano_model_dir), lora={"r": 2, "target_modules": ["q_proj", "qkv"]})
    with pytest.raises(UserError, match=r"model.lora.target_modules.*no Linear module named 'qkv'; it has .*q_proj"):
        PolicyModel.load(settings, device="cpu")
    with pytest.raises(UserError, match="no Linear module named 'attn_.*'"):
        PolicyModel.load(ModelSettings(path=str(nano_model_dir), lora={"target_modules": "attn_.*"}), device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# D1. Stage names are plain and unique; D7. a pipeline is checked whole before anything runs


def _pipeline(tmp_path: Path, stages: list[dict], name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "runs"), "tracking": {"mode": "disabled"},
                                    "stages": stages}))
    return path


@pytest.mark.parametrize("names, expected", [
    (["../../escaped"], r"stages.0.name' must be a plain name"),
    (["pretrain", "./pretrain"], r"stages.1.name' must be a plain name"),
    (["x" * 65], r"stages.0.name' must be a plain name"),
    (["pretrain", "Pretrain"], "stage name 'Pretrain' is used twice"),
    ([], "config key 'stages' list should have at least 1 item"),
])
def test_stage_names_are_plain_and_unique_and_a_pipeline_has_stages(tmp_path, names, expected):
    path = _pipeline(tmp_path, [{"name": n, "kind": "pretrain"} for n in names])
    with pytest.raises(UserError, match=expected):
        run_pipeline(path, [])
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escaped").exists()


def test_an_input_path_stays_inside_its_stage_directory(tmp_path):
    path = _pipeline(tmp_path, [{"name": "a", "kind": "pretrain"},
                                {"name": "b", "kind": "sft", "inputs": {"model.path": "a/../../elsewhere"}}])
    with pytest.raises(UserError, match="must stay inside that stage's directory"):
        load_pipeline(path, [])


def test_stages_given_a_scalar_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nstages: 5\n")
    with pytest.raises(UserError, match="config key 'stages'"):
        load_pipeline(path, [])


def test_yaml_duplicate_keys_are_refused_with_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\ntrain:\n  max_steps: 3\n  max_steps: 30\n")
    with pytest.raises(UserError, match=r"c.yaml:5: invalid YAML \(key 'max_steps' is given twice \(first on line 4\)\)"):
        read_yaml(path)
    path.write_text("base: &b\n  lr: 0.1\noptim:\n  <<: *b\n  lr: 0.2\n")  # overriding a merged key is fine
    assert read_yaml(path)["optim"]["lr"] == 0.2


def test_a_bad_value_in_a_later_stage_is_reported_before_any_stage_runs(tmp_path):
    path = _pipeline(tmp_path, [
        {"name": "pretrain", "kind": "pretrain", "overrides": {"model.scratch_size": "nano"}},
        {"name": "sft", "kind": "sft", "inputs": {"model.path": "pretrain"}, "overrides": {"optim.lr": -1}},
    ])
    with pytest.raises(UserError, match=r"stage 'sft': .*config key 'optim.lr' input should be greater than 0"):
        run_pipeline(path, [])
    assert not (tmp_path / "runs").exists(), "nothing ran"


def test_pipeline_ends_with_a_summary_of_every_stage(tmp_path, capsys):
    overrides = {f"pretrain.{k}": v for k, v in _pretrain_cfg(tmp_path).model_dump(mode="json").items()
                 if k in ("model", "data")}
    path = _pipeline(tmp_path, [{"name": "pretrain", "kind": "pretrain", "overrides": {
        "model.scratch_size": "nano", "model.tokenizer": str(TOKENIZER), "data.train": overrides["pretrain.data"]["train"],
        "data.block_size": 16, "train.max_steps": 2, "train.batch_size": 2}}])
    run_pipeline(path, [])
    out = capsys.readouterr().out
    assert "pipeline 't' summary" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("pretrain") and "ran" in ln)
    assert "loss/total" in line and "eval/loss" in line

    class Spec:
        def __init__(self, name, kind):
            self.name, self.kind = name, kind

    class Pipe:
        name, output_dir = "demo", "runs/demo"
        stages = [Spec("reward", "reward"), Spec("eval", "eval"), Spec("sft", "sft")]

    text = format_summary(Pipe, {
        "reward": {"status": "ran", "metrics": {"loss/total": 0.61, "eval/accuracy": 0.713, "eval/noise_ceiling": 0.8,
                                                "eval/ece": 0.02}},
        "eval": {"status": "skipped", "metrics": {"eval/sft/gold_score": 0.5, "eval/sft/gold_score/add": 0.9,
                                                  "eval/base/gold_score": 0.1}},
    })
    reward_line, eval_line, sft_line = text.splitlines()[1:]
    assert "ran" in reward_line and "eval/accuracy 0.713  eval/noise_ceiling 0.8" in reward_line and "ece" not in reward_line
    assert "skipped" in eval_line and "eval/sft/gold_score 0.5" in eval_line and "/add" not in eval_line
    assert "not selected" in sft_line


# ---------------------------------------------------------------------------------------------------------------
# D2. A complete artifact of another stage or kind is deleted only with --overwrite


def test_a_pipeline_never_deletes_another_kinds_artifact_without_overwrite(tmp_path):
    out = tmp_path / "stage"
    assert claim(out, stage="model", kind="pretrain", fingerprint="aaa") == "fresh"
    write_manifest(out, {**read_manifest(out), "status": "complete"})
    (out / "model.safetensors").write_text("weights")
    with pytest.raises(UserError, match=r"holds a complete 'pretrain' artifact of stage 'model', not this 'sft'.*--overwrite"):
        claim(out, stage="model", kind="sft", fingerprint="bbb", rerun=True, fresh=True)
    assert (out / "model.safetensors").is_file()
    # the pipeline's own stage with a changed config reruns; the single-stage command asks for --overwrite
    with pytest.raises(UserError, match="made with a different config; pass --overwrite"):
        claim(out, stage="model", kind="pretrain", fingerprint="ccc")
    assert claim(out, stage="model", kind="pretrain", fingerprint="ccc", rerun=True) == "fresh"
    assert claim(out, stage="model", kind="sft", fingerprint="ddd", overwrite=True) == "fresh"


def test_rlhf_run_refuses_a_stage_directory_holding_another_kind(tmp_path):
    from rlhf.cli import build_parser

    foreign = tmp_path / "runs" / "pretrain"
    assert claim(foreign, stage="pretrain", kind="sft", fingerprint="x") == "fresh"
    write_manifest(foreign, {**read_manifest(foreign), "status": "complete"})
    (foreign / "model.safetensors").write_text("a finished sft model")
    path = _pipeline(tmp_path, [{"name": "pretrain", "kind": "pretrain", "overrides": {"model.scratch_size": "nano"}}])
    with pytest.raises(UserError, match="holds a complete 'sft' artifact.*pass --overwrite"):
        run_pipeline(path, [])
    assert (foreign / "model.safetensors").read_text() == "a finished sft model"
    assert build_parser().parse_args(["run", str(path), "--overwrite"]).overwrite


# ---------------------------------------------------------------------------------------------------------------
# D3. Broken model directories


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, nano_model_dir):
    root = tmp_path_factory.mktemp("broken")
    weights = (nano_model_dir / "model.safetensors").read_bytes()
    dirs = {}
    for name in ("corrupt", "truncated", "no_config"):
        dirs[name] = root / name
        shutil.copytree(nano_model_dir, dirs[name])
    (dirs["corrupt"] / "model.safetensors").write_bytes(b"\x07garbage" * 16)
    (dirs["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (dirs["no_config"] / "config.json").unlink()
    dirs["tokenizer_only"] = root / "tokenizer_only"
    shutil.copytree(TOKENIZER, dirs["tokenizer_only"])
    return dirs


@pytest.mark.parametrize("broken, expected", [
    ("corrupt", "could not load a causal LM .*SafetensorError"),
    ("truncated", "could not load a causal LM .*SafetensorError"),
    ("no_config", "not a model directory: no config.json"),
    ("tokenizer_only", r"not a model directory: no config.json \(it holds only a tokenizer\)"),
])
def test_broken_model_directories_are_one_line_errors_in_sft_reward_and_eval(broken_models, broken, expected):
    from rlhf.policy import PolicyModel
    from reward_models.model import RewardModel

    path = str(broken_models[broken])
    for load in (lambda: PolicyModel.from_pretrained(path), lambda: RewardModel.from_backbone(path)):
        with pytest.raises(UserError, match=expected) as info:
            load()
        assert "\n" not in str(info.value)


def test_a_corrupt_reward_model_and_a_missing_model_path(tmp_path, nano_model_dir):
    from reward_models.model import RewardModel

    rm_dir = tmp_path / "rm"
    RewardModel.from_backbone(str(nano_model_dir)).save(rm_dir)
    (rm_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="could not load a reward model"):
        RewardModel.load(str(rm_dir))
    for name in ("runs/does-not-exist", "does-not-exist"):  # not a hub-id message: not found
        with pytest.raises(UserError, match=f"^model path not found: {name}"):
            RewardModel.from_backbone(name)


# ---------------------------------------------------------------------------------------------------------------
# D4. Text that is not UTF-8


def test_files_that_are_not_utf8_name_the_file_and_line_and_a_bom_is_read(tmp_path):
    good = '{"text": "a"}\n{"text": "b"}\n'
    cases = {
        "binary.jsonl": (bytes(range(256)) * 4, r"binary.jsonl:1: not UTF-8 text \(a NUL byte"),
        "one_bad_line.jsonl": (good.encode() + b'{"text": "caf\xe9"}\n',
                               r"one_bad_line.jsonl:3: not UTF-8 text \(byte 0xe9 at column 14\)"),
        "utf16.jsonl": (good.encode("utf-16"), "utf16.jsonl: the file is UTF-16/32 encoded"),
        "utf16_no_bom.jsonl": (good.encode("utf-16-le"), r"utf16_no_bom.jsonl:1: not UTF-8 text \(a NUL byte"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=expected):
            load_records(tmp_path / name)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode())
    assert [r["text"] for r in load_records(tmp_path / "bom.jsonl")] == ["a", "b"]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "a"}]).encode())
    assert load_records(tmp_path / "bom.json")[0]["text"] == "a"

    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbftrain:\n  max_steps: 3\n")
    assert read_yaml(tmp_path / "bom.yaml") == {"train": {"max_steps": 3}}
    (tmp_path / "utf16.yaml").write_bytes("train:\n  max_steps: 3\n".encode("utf-16"))
    with pytest.raises(UserError, match="utf16.yaml: the file is UTF-16/32 encoded"):
        read_yaml(tmp_path / "utf16.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: x\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.yaml:2: not UTF-8 text"):
        read_yaml(tmp_path / "latin1.yaml")


# ---------------------------------------------------------------------------------------------------------------
# D5. SFT rows with lists of strings


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "completion": ["a", "b"]}, r"row:1: field 'completion' item 0 must be a \{role, content\} message object; got str"),
    ({"messages": ["hi", "there"]}, r"row:1: field 'messages' item 0 must be a \{role, content\} message object; got str"),
    ({"prompt": ["hi"], "completion": "x"}, r"row:1: field 'prompt' item 0 must be"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"item 0 must be .*got an object with keys \['role'\]"),
    ({"messages": "hi"}, "field 'messages' must be a list"),
])
def test_sft_rows_with_lists_of_strings_are_errors_naming_the_row(tokenizer, row, expected):
    with pytest.raises(UserError, match=expected):
        sft_texts(Record.at(row, "row:1"), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# D6. Output directories that cannot hold a stage


def test_output_dirs_that_cannot_hold_a_stage_are_one_line_errors(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (afile, "is a file, not a directory"),
        (afile / "sub" / "stage", f"lies under the file {afile}"),
        (tmp_path / ("x" * 300), "longer than 255 bytes"),
    ]
    for out, expected in cases:
        with pytest.raises(UserError, match=expected) as info:
            claim(out, stage="s", kind="sft", fingerprint="a")
        assert "\n" not in str(info.value)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(UserError, match=f"{locked} is not writable"):
        claim(locked / "stage", stage="s", kind="sft", fingerprint="a")
    monkeypatch.setattr(os, "access", real_access)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)  # e.g. a read-only file system the access check cannot see
    with pytest.raises(UserError, match=r"cannot use it as the stage's directory \(Permission denied\)"):
        claim(tmp_path / "ro" / "stage", stage="s", kind="sft", fingerprint="a")


# ---------------------------------------------------------------------------------------------------------------
# D8. A LoRA adapter records its base model as an absolute path


def test_a_lora_adapter_loads_from_any_working_directory(tmp_path, nano_model_dir, monkeypatch):
    from rlhf.policy import PolicyModel

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(nano_model_dir, work / "base")
    monkeypatch.chdir(work)
    policy = PolicyModel.load(ModelSettings(path="base", lora={"r": 2, "alpha": 4}), device="cpu")
    policy.save(work / "adapter")
    base = json.loads((work / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((work / "base").resolve())
    monkeypatch.chdir(tmp_path)
    loaded = PolicyModel.from_pretrained(str(work / "adapter"))
    assert loaded.model.get_input_embeddings().num_embeddings == len(loaded.tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# The command line: exit 2, one line, no traceback


def test_cli_bad_input_cases_exit_2_with_one_line(tmp_path, broken_models):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"text": "a"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    escaped = _pipeline(tmp_path, [{"name": "../../escaped", "kind": "pretrain"}])
    cases = [  # each is a subprocess of ~10 s on 2 cores: the rest is covered in-process above
        (["sft", f"model.path={broken_models['corrupt']}", f"output_dir={tmp_path / 'o1'}", "tracking.mode=disabled"],
         "could not load a causal LM"),
        (["pretrain", f"data.train={data}", "model.scratch_size=nano", f"output_dir={tmp_path / 'o2'}",
          "tracking.mode=disabled"], f"{data}:2: not UTF-8 text"),
        (["run", str(escaped)], "must be a plain name"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for args, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              env=env, timeout=180)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert err and expected in err[-1] and err[-1].startswith("error: ") and "Traceback" not in proc.stderr, (args, err)
