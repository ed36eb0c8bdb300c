"""Loading, validation, tokenization and collation of text data.

Sources: a JSONL / JSON / parquet file, a directory written by `datasets.save_to_disk`, or a hub id (needs network).
Every record remembers where it came from (`file:line`) so validation errors can point at it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from rlhf.config import read_text_file
from rlhf.errors import UserError
from rlhf.vision import message_text, record_images

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

# Text no model can read: ~a million-token context at 4 characters a token. A field past this is refused before any
# tokenizer sees it (tokenizing hundreds of MB aborts the process).
MAX_TEXT_CHARS = 1 << 22
MAX_RECORD_DEPTH = 50  # nesting of one record (chat messages are 3 deep); deeper would overflow the stack later
CHARS_PER_TOKEN = 64  # no token is longer: text of more than n × this characters is certainly more than n tokens


class Record(dict):
    """One example as a dict, plus `.origin` ("file:line" or "name[index]") for error messages."""

    origin: str = "?"

    @classmethod
    def at(cls, data: dict, origin: str) -> "Record":
        rec = cls(data)
        rec.origin = origin
        return rec


def load_records(source: str | Path, split: str = "train") -> list[Record]:
    """Read every example of `source`. Raises `UserError` for a missing, malformed or empty source."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        records = _read_file(path)
    elif path.is_dir():
        records = _read_saved_dataset(path, split)
    elif path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"data file not found: {source}")
    else:
        records = _read_hub_dataset(source, split)
    if not records:
        raise UserError(f"{source}: dataset is empty")
    for rec in records:
        check_record(rec)
        if path.is_file():
            absolute_image_paths(rec, path.parent)
    return records


def absolute_image_paths(record: Record, base: Path) -> None:
    """Make a record's relative image paths (`images` / `image`, relative to its file) absolute, so the record can be
    copied, re-written elsewhere (e.g. as a preference pair) and still find its images."""
    for name in ("images", "image"):
        value = record.get(name)
        items = value if isinstance(value, list) else [value]
        fixed = [str((base / item).resolve()) if isinstance(item, str) and item and not Path(item).expanduser().is_absolute()
                 else item for item in items]
        if value not in (None, []) and fixed != items:
            record[name] = fixed if isinstance(value, list) else fixed[0]


def check_record(record: Record) -> None:
    """Refuse a record with a text field longer than `MAX_TEXT_CHARS` or nested deeper than `MAX_RECORD_DEPTH`."""
    stack: list[tuple[dict | list, str, int]] = [(record, "", 0)]
    while stack:
        node, name, depth = stack.pop()
        if depth >= MAX_RECORD_DEPTH:
            raise UserError(f"{record.origin}: field '{name.split('.')[0]}' is nested more than {MAX_RECORD_DEPTH} "
                            "levels deep")
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
                raise UserError(f"{record.origin}: field '{name}{key}' is {len(value):,} characters, more than the "
                                f"{MAX_TEXT_CHARS:,} any model context holds; shorten it or drop the record")
            if isinstance(value, (dict, list)):
                stack.append((value, f"{name}{key}.", depth + 1))


def _read_file(path: Path) -> list[Record]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable parquet file ({exc})") from None
        return [Record.at(row, f"{path}[{i}]") for i, row in enumerate(rows)]
    text = read_text_file(path)  # UTF-8 (a BOM is dropped); anything else is an error naming file and line
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        except RecursionError:
            raise UserError(f"{path}: JSON nested too deeply (a record has at most {MAX_RECORD_DEPTH} levels)") from None
        return [Record.at(_require_object(row, f"{path}[{i}]"), f"{path}[{i}]") for i, row in enumerate(rows)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{lineno}: JSON nested too deeply (a record has at most {MAX_RECORD_DEPTH} levels)") from None
        records.append(Record.at(_require_object(row, f"{path}:{lineno}"), f"{path}:{lineno}"))
    return records


def _require_object(row: Any, origin: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{origin}: expected a JSON object, got {type(row).__name__}")
    return row


def _read_saved_dataset(path: Path, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: not a dataset directory (no datasets.save_to_disk files)") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    return [Record.at(row, f"{path}[{i}]") for i, row in enumerate(ds)]


def _read_hub_dataset(name: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown id, bad split: all the same to the user
        raise UserError(f"could not load dataset '{name}' (not a local path; hub load failed: {type(exc).__name__})") from None
    return [Record.at(row, f"{name}[{i}]") for i, row in enumerate(ds)]


def require_fields(record: Record, fields: Iterable[str], kind: type | tuple = str) -> None:
    """Raise `UserError("<origin>: missing field 'x'")` unless every field is present with the given type."""
    for name in fields:
        if name not in record or record[name] is None:
            raise UserError(f"{record.origin}: missing field '{name}'")
        if not isinstance(record[name], kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise UserError(f"{record.origin}: field '{name}' must be {expected}, got {type(record[name]).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Prompts (evaluation and RL)


def load_prompts(source: str | Path, limit: int | None = None) -> list[Record]:
    """Prompt records: `prompt` (text, or a list of chat messages), optional `task` and `meta`."""
    if limit is not None and limit < 1:
        raise UserError(f"{source}: a prompt limit must be at least 1 (null = all prompts); got {limit}")
    records = load_records(source)[:limit]
    for rec in records:
        require_fields(rec, ["prompt"], (str, list))
    return records


# ---------------------------------------------------------------------------------------------------------------
# SFT


@dataclass
class SFTExample:
    input_ids: list[int]
    completion_mask: list[bool]  # True on completion tokens (the ones the task loss trains)
    task: str | None
    origin: str
    images: list = field(default_factory=list)  # the prompt's images (PIL), for a vision-language model


def sft_texts(record: Record, tokenizer) -> tuple[str, str]:
    """Split a record into (prompt text, completion text).

    Accepts `prompt`/`completion` strings, conversational `prompt`/`completion` message lists, or `messages`
    (the last assistant turn is the completion; earlier turns form the prompt through the chat template).
    """
    if "messages" in record:
        messages = _require_messages(record, "messages")
        if not messages:
            raise UserError(f"{record.origin}: field 'messages' must be a non-empty list of {{role, content}} objects")
        if messages[-1].get("role") != "assistant":
            raise UserError(f"{record.origin}: the last message must have role 'assistant'")
        return _chat_prompt(messages[:-1], tokenizer, record), message_text(messages[-1].get("content", ""))
    require_fields(record, ["prompt", "completion"], (str, list))
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):
        prompt = _chat_prompt(_require_messages(record, "prompt"), tokenizer, record)
    if isinstance(completion, list):
        completion = "".join(str(m.get("content", "")) for m in _require_messages(record, "completion"))
    return prompt, completion


def _require_messages(record: Record, name: str) -> list[dict]:
    """`record[name]` as a list of chat messages: {role, content} objects (a list of plain strings is an error)."""
    messages = record[name]
    if not isinstance(messages, list):
        raise UserError(f"{record.origin}: field '{name}' must be a list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            got = type(message).__name__ if not isinstance(message, dict) else f"an object with keys {sorted(message)}"
            raise UserError(f"{record.origin}: field '{name}' item {i} must be a {{role, content}} message object; got {got}")
    return messages


def load_task_prompts(source: str | Path, tasks: list[str] | None, limit: int | None) -> list[Record]:
    """Prompt records of `tasks` only (when given; none left is an error), the first `limit` of them, `prompt` as
    stored: the task filter is applied before the limit, so `limit` counts prompts of those tasks."""
    records = load_prompts(source)
    if tasks is not None:
        records = [r for r in records if r.get("task") in tasks]
        if not records:
            raise UserError(f"{source}: no prompt has a task in {tasks}")
    return records[:limit]


def load_rl_prompts(source: str | Path, tasks: list[str] | None, limit: int | None, tokenizer,
                    max_prompt_tokens: int | None = None, image_inputs=None, model_name: str = "the policy") -> list[Record]:
    """Prompt records for an RL stage (`load_task_prompts`), with `prompt` as text (chat-message prompts rendered
    through the tokenizer's template). A prompt of more than `max_prompt_tokens` tokens (`prompt_budget`; image
    tokens count) is an error naming its record, and so are images a text-only model cannot take and image prompts
    a vision-language model (`image_inputs`) cannot (`rlhf.vision.check_image_prompts`)."""
    from rlhf.vision import check_image_prompts

    records = load_task_prompts(source, tasks, limit)
    for r in records:
        r["prompt"] = prompt_text(r, tokenizer)
    check_image_prompts(records, image_inputs, model_name)
    if max_prompt_tokens is not None:
        for r in records:
            _check_prompt_length(r, tokenizer, max_prompt_tokens, image_inputs)
    return records


def prompt_budget(model_config, max_new_tokens: int, key: str = "sampling.max_new_tokens") -> int | None:
    """Tokens a prompt may have so that it and `max_new_tokens` fit the model's context (`max_position_embeddings`,
    of the language model in a vision-language one); None when the model config names no context. `key` is the
    config key of `max_new_tokens`, for the error."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    context = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return None
    if max_new_tokens >= context:
        raise UserError(f"config key '{key}' is {max_new_tokens}, but the model's context is {context} tokens "
                        "(max_position_embeddings): no room is left for a prompt")
    return context - max_new_tokens


def _check_prompt_length(record: Record, tokenizer, max_tokens: int, image_inputs=None) -> None:
    text = record["prompt"] if image_inputs is None else image_inputs.expand(record["prompt"])
    why = "(the model's context minus the response budget)"
    if len(text) > max_tokens * CHARS_PER_TOKEN:  # surely too long: not worth tokenizing
        raise UserError(f"{record.origin}: prompt is {len(text):,} characters, far more than the {max_tokens} tokens "
                        f"a prompt may have {why}")
    n = len(encode_prompt(text, tokenizer))
    if n > max_tokens:
        raise UserError(f"{record.origin}: prompt is {n} tokens, more than the {max_tokens} a prompt may have {why}")


def prompt_text(record: Record, tokenizer) -> str:
    """A prompt record's `prompt` as text: a string as is, chat messages through the tokenizer's template."""
    prompt = record["prompt"]
    return _chat_prompt(_require_messages(record, "prompt"), tokenizer, record) if isinstance(prompt, list) else prompt


def _chat_prompt(messages: list[dict], tokenizer, record: Record) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"{record.origin}: conversational data needs a tokenizer with a chat template")
    # TRL's typed content parts (text and image) as text, so any template renders them
    messages = [{**m, "content": message_text(m.get("content"))} for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a prompt, with BOS added once (a chat template may already have written it)."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special).input_ids


def tokenize_sft(
    records: list[Record], tokenizer, max_length: int, skip_overlong_prompts: bool = False, image_inputs=None,
) -> tuple[list[SFTExample], int]:
    """Tokenize prompt/completion pairs. Returns (examples, number skipped).

    Length policy: a prompt that leaves no room for a completion token is an error naming the record (or, with
    `skip_overlong_prompts`, dropped and counted); a completion that does not fit is cut on the right.
    `image_inputs` (`rlhf.vision.ImageInputs`, a vision-language model): each prompt's image placeholder becomes the
    model's image tokens (counted in the length) and the example keeps the image.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; SFT needs one to teach the model to stop")
    examples, skipped = [], 0
    for rec in records:
        prompt, completion = sft_texts(rec, tokenizer)
        if not completion.strip():
            raise UserError(f"{rec.origin}: field 'completion' is empty")
        # text far longer than max_length tokens is not tokenized whole: the prompt is overlong, the completion is cut
        completion = completion[:max_length * CHARS_PER_TOKEN]
        if len(prompt) > max_length * CHARS_PER_TOKEN:
            if skip_overlong_prompts:
                skipped += 1
                continue
            raise UserError(
                f"{rec.origin}: prompt is {len(prompt):,} characters, far more than max_length={max_length} tokens "
                "(policy: overlong prompts are errors; set data.skip_overlong_prompts=true to drop them)"
            )
        if image_inputs is not None:
            prompt = image_inputs.expand(prompt)
        prompt_ids = encode_prompt(prompt, tokenizer)
        if len(prompt_ids) >= max_length:
            if skip_overlong_prompts:
                skipped += 1
                continue
            raise UserError(
                f"{rec.origin}: prompt is {len(prompt_ids)} tokens, max_length is {max_length} "
                "(policy: overlong prompts are errors; set data.skip_overlong_prompts=true to drop them)"
            )
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids = (prompt_ids + completion_ids)[:max_length]
        mask = ([False] * len(prompt_ids) + [True] * len(completion_ids))[:max_length]
        images = record_images(rec) if image_inputs is not None else []
        examples.append(SFTExample(ids, mask, rec.get("task"), rec.origin, images))
    if skipped:
        log.warning("skipped %d examples whose prompt is longer than max_length=%d", skipped, max_length)
    if not examples:
        raise UserError("no SFT examples left after applying the length policy")
    return examples, skipped


def collate_sft(examples: list[SFTExample], pad_token_id: int, image_inputs=None) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Returns input_ids, attention_mask, completion_mask, all (B, L), and with `image_inputs`
    (a vision-language model) each row's image as pixel_values (B, C, H, W)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.bool)
    comp = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = True
        comp[i, :n] = torch.tensor(e.completion_mask)
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
    if image_inputs is not None:
        batch["pixel_values"] = image_inputs.pixel_values([e.images[0] for e in examples])
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Pretraining


def pack_corpus(records: list[Record], tokenizer, block_size: int, text_field: str = "text") -> torch.Tensor:
    """Tokenize documents (BOS ... EOS each), concatenate and cut into full blocks. Shape: (N, block_size).

    Packing wastes no compute on padding; the remainder shorter than a block is dropped.
    """
    stream: list[int] = []
    for rec in records:
        require_fields(rec, [text_field])
        ids = tokenizer(rec[text_field]).input_ids
        stream.extend(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise UserError(f"corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
