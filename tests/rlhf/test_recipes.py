"""Stage smoke tests: a few steps each; finite loss, parameters changed, Hugging Face artifacts written."""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhf.config import load_config
from rlhf.pipeline import run_stage
from rlhf.policy import PolicyModel
from rlhf.recipes import sft
from rlhf.stage import read_manifest

ROOT = Path(__file__).resolve().parents[2]


def _sft_data(tmp_path):
    rows = [json.loads(line) for line in (ROOT / "data/demo/sft.jsonl").read_text().splitlines()[:64]]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, nano_model_dir, **overrides):
    base = {
        "output_dir": str(tmp_path / "out"), "model.path": str(nano_model_dir), "action_tokens": ["<add>", "<review>"],
        "data.train": str(_sft_data(tmp_path)), "data.gold_prompts": None, "data.max_length": 48,
        "train.max_steps": 3, "train.batch_size": 4, "optim.lr": 0.01, "tracking.mode": "disabled",
    }
    return load_config(sft.Config, None, {**base, **overrides})


def test_sft_full_finetune_changes_weights_and_writes_hf_artifacts(tmp_path, nano_model_dir):
    result = run_stage("sft", _cfg(tmp_path, nano_model_dir))
    out = tmp_path / "out"
    assert math.isfinite(result["metrics"]["loss/total"]) and math.isfinite(result["metrics"]["eval/loss"])
    before = load_file(str(nano_model_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    policy = PolicyModel.from_pretrained(str(out))
    assert "<add>" in policy.tokenizer.get_vocab() and policy.model.get_input_embeddings().num_embeddings == len(policy.tokenizer)
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["kind"] == "sft" and (out / "config.yaml").is_file()


def test_sft_with_lora_writes_a_loadable_adapter(tmp_path, nano_model_dir):
    run_stage("sft", _cfg(tmp_path, nano_model_dir, **{"model.lora": {"r": 4, "alpha": 8}}))
    out = tmp_path / "out"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "adapters moved off zero"
    policy = PolicyModel.from_pretrained(str(out))  # base + adapter, merged on load
    r = policy.generate(["<add> 1+2="], max_new_tokens=4, seed=0)
    assert torch.isfinite(policy.logprobs(r)).all()


def test_sft_bf16_and_gradient_accumulation_run(tmp_path, nano_model_dir):
    result = run_stage("sft", _cfg(tmp_path, nano_model_dir, **{"train.precision": "bf16", "train.grad_accum": 2}))
    assert math.isfinite(result["metrics"]["loss/total"])
