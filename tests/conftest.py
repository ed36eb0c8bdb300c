"""Shared fixtures: the demo world's tokenizer and tiny models built from config, saved like hub checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# one thread per test process: torch's OpenMP threads spin-wait and collapse on a busy 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "data" / "demo" / "tokenizer"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def nano_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised 'nano' demo-world Llama saved with save_pretrained (loads like a hub model)."""
    from rlhf.world import build_tiny_lm

    path = tmp_path_factory.mktemp("nano-model")
    model = build_tiny_lm(tokenizer, "nano", seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    """A nano demo-world Llama with the action tokens, saved as the SFT stage would leave it."""
    from rlhf.policy import add_special_tokens, load_tokenizer
    from rlhf.world import build_tiny_lm

    path = tmp_path_factory.mktemp("policy")
    tok = load_tokenizer(str(TOKENIZER_DIR))
    model = build_tiny_lm(tok, "nano", seed=0)
    add_special_tokens(model, tok, ["<add>", "<review>"])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def kill_and_resume():
    """`run(args, out) -> text`: start `rlhf <args> output_dir=<out>` in a subprocess, SIGKILL it as soon as its first
    checkpoint appears, check the killed stage does not look complete, then rerun the same command to the end and
    return what it printed (the caller compares its final metrics with an uninterrupted run's)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from rlhf.stage import read_manifest

    def start(args, out):
        return subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args, f"output_dir={out}"], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def run(args: list[str], out: Path) -> str:
        proc = start(args, out)
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list((out / "checkpoints").glob("step-*")), "no checkpoint appeared before the run ended"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert read_manifest(out)["status"] == "running", "a killed stage must not look complete"
        resumed = start(args, out)
        text, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, text
        return text

    return run


# ---------------------------------------------------------------------------------------------------------------
# A tiny chat model as a GGUF file, written here with the `gguf` package: what `rlhf import-model` reads


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    shifted = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + shifted)
            shifted += 1
    return [chr(c) for c in cs]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, *, arch: str = "llama", eos_id: int = 2, raw_tensor_type=None) -> Path:
    """A 2-layer Llama with a ChatML template and a 262-token byte-level BPE vocabulary, its pad token = EOS (as
    SmolLM2 ships it). Some matrices are Q8_0-quantized; `raw_tensor_type` stores one as that type instead."""
    import gguf
    import numpy as np

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "Ġ a", "h e"]
    tokens = specials + _gpt2_byte_chars() + [m.replace(" ", "") for m in merges]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 64, 128, 2, 4, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny chat")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_id)
    w.add_unk_token_id(0)
    w.add_pad_token_id(eos_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(0)

    def tensor(name, *shape, quantize=False):
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if quantize:
            w.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, values)

    tensor("token_embd.weight", vocab, hidden, quantize=True)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden, quantize=True)
        tensor(f"blk.{i}.attn_k.weight", hidden * kv_heads // heads, hidden, quantize=True)
        tensor(f"blk.{i}.attn_v.weight", hidden * kv_heads // heads, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    if raw_tensor_type is not None:  # raw bytes of one block row per output row, as that type lays them out
        block, size = gguf.GGML_QUANT_SIZES[raw_tensor_type]
        w.add_tensor("blk.0.extra.weight", np.zeros((hidden, size), dtype=np.uint8), raw_dtype=raw_tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """The tiny GGUF chat model imported as a Hugging Face directory (`rlhf import-model`)."""
    from rlhf.model_import import import_model

    root = tmp_path_factory.mktemp("chat_model")
    return import_model(str(write_tiny_gguf(root / "tiny.gguf")), root / "hf")


@pytest.fixture(scope="session")
def gguf_writer():
    """`write_tiny_gguf` for tests that write their own variants (another architecture, EOS, tensor type)."""
    return write_tiny_gguf


# ---------------------------------------------------------------------------------------------------------------
# Vision: the small rendered world, a nano ViT and a tiny LLaVA-style policy of it and the nano Llama


@pytest.fixture(scope="session")
def vision_world(tmp_path_factory) -> Path:
    """The vision world at its small sizes (`rlhf.world.vision.generate(small=True)`)."""
    from rlhf.world.vision import generate

    path = tmp_path_factory.mktemp("vision-world")
    generate(path, seed=0, small=True)
    return path


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory) -> Path:
    """A randomly initialised nano ViT (32 px images, 8 px patches: 16 image tokens) with its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory, policy_dir, vit_dir) -> Path:
    """A tiny vision-language policy (nano ViT + projector + the nano Llama of `policy_dir`), saved as a stage would."""
    from rlhf.config import ModelSettings
    from rlhf.policy import PolicyModel

    path = tmp_path_factory.mktemp("vlm")
    PolicyModel.load(ModelSettings(path=str(policy_dir), vision_tower=str(vit_dir)), device="cpu").save(path)
    return path
