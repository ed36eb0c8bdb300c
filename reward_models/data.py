"""Preference data: loading, validation, tokenization and collation.

Accepted rows follow TRL's preference formats (https://huggingface.co/docs/trl/dataset_formats#preference):

    standard, explicit prompt      {"prompt": "...", "chosen": "...", "rejected": "..."}
    standard, implicit prompt      {"chosen": "<prompt + response>", "rejected": "<prompt + response>"}
    conversational, explicit       {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], ...}
    conversational, implicit       {"chosen": [<whole conversation>], "rejected": [<whole conversation>]}

plus two optional fields: `margin` (float, the score gap the pair should have, Llama 2 §3.2.2; TRL reads it too)
and `tie` (bool, the annotator saw no difference; trained with the symmetric loss for label ½). Any other field
(`task`, `meta`, ...) rides along untouched. Rows come from `rlhf.data.load_records` (JSONL, parquet, a
`datasets.save_to_disk` directory or a hub id), so every error names `file:line` and the field.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from rlhf.data import Record, encode_prompt, load_records
from rlhf.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    """One validated pair, with conversations already rendered to text (`prompt` is "" for implicit prompts)."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    tie: bool = False
    origin: str = "?"
    extra: dict = field(default_factory=dict)  # the row's other fields (task, meta, ...)

    @property
    def label(self) -> float:
        """P(chosen wins) the loss fits: 1.0 for a strict preference, 0.5 for a tie."""
        return 0.5 if self.tie else 1.0


def load_preferences(source: str, tokenizer=None, split: str = "train") -> list[PreferencePair]:
    """Read and validate preference pairs. Pairs whose two responses are identical carry no preference: they are
    skipped and counted in one warning. Raises `UserError` for malformed rows or when nothing is left."""
    pairs, identical = [], 0
    for record in load_records(source, split):
        pair = parse_pair(record, tokenizer)
        if pair.chosen == pair.rejected:
            identical += 1
            continue
        pairs.append(pair)
    if identical:
        log.warning("%s: skipped %d pair(s) whose chosen and rejected responses are identical", source, identical)
    if not pairs:
        raise UserError(f"{source}: no usable preference pairs (all {identical} have chosen == rejected)")
    return pairs


def parse_pair(record: Record, tokenizer=None) -> PreferencePair:
    """Validate one row and render it to text. `tokenizer` (its chat template) is only needed for conversations."""
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise UserError(f"{record.origin}: missing field '{name}'")
    kinds = {name: _kind(record, name) for name in ("prompt", "chosen", "rejected") if record.get(name) is not None}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"'{k}' is {v}" for k, v in kinds.items())
        raise UserError(f"{record.origin}: fields mix text and conversation ({listed}); use one format per row")
    if kinds["chosen"] == "conversation":
        prompt, chosen, rejected = _render_conversation(record, tokenizer)
    else:
        prompt, chosen, rejected = record.get("prompt") or "", record["chosen"], record["rejected"]
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise UserError(f"{record.origin}: field '{name}' is an empty response")
    margin = record.get("margin")
    if margin is None:
        margin = 0.0
    elif isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise UserError(f"{record.origin}: field 'margin' must be a finite number, got {margin!r}")
    tie = record.get("tie")
    if tie is None:
        tie = False
    elif not isinstance(tie, bool):
        raise UserError(f"{record.origin}: field 'tie' must be true or false, got {tie!r}")
    extra = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "margin", "tie")}
    return PreferencePair(prompt, chosen, rejected, float(margin), tie, record.origin, extra)


def _kind(record: Record, name: str) -> str:
    value = record[name]
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        if not value:
            raise UserError(f"{record.origin}: field '{name}' is an empty conversation")
        return "conversation"
    raise UserError(
        f"{record.origin}: field '{name}' must be a string or a list of {{role, content}} messages, "
        f"got {type(value).__name__}"
    )


def _render_conversation(record: Record, tokenizer) -> tuple[str, str, str]:
    """Conversation -> (prompt, chosen, rejected) text. With a chat template this is TRL's own
    `maybe_apply_chat_template` (prompt rendered with the generation prompt, responses as the continuation);
    without one (e.g. a BERT encoder) each message becomes a "role: content" line."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from trl.data_utils import maybe_apply_chat_template

        row = {k: record[k] for k in ("prompt", "chosen", "rejected") if record.get(k) is not None}
        try:
            out = maybe_apply_chat_template(row, tokenizer)
        except Exception as exc:  # jinja raises its own types for malformed messages
            raise UserError(f"{record.origin}: chat template failed on this conversation ({exc})") from None
        return out.get("prompt", ""), out["chosen"], out["rejected"]

    def lines(messages: list[dict]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    prompt = lines(record["prompt"]) if record.get("prompt") else ""
    joiner = "\n" if prompt else ""
    return prompt, joiner + lines(record["chosen"]), joiner + lines(record["rejected"])


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and collation


@dataclass
class Encoded:
    """One scored sequence: token ids and, for encoders fed a (prompt, response) text pair, segment ids."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None


def encode_response(tokenizer, backbone: str, prompt: str, completion: str, max_length: int) -> tuple[Encoded, bool]:
    """Tokenize what the reward model reads for one (prompt, response). Returns (encoded, was_truncated).

    decoder: BOS + prompt + response + EOS as one sequence (TRL `RewardTrainer` appends EOS the same way), so the
        score is read at the EOS. Too long -> the oldest tokens are dropped: the score head reads the end.
    encoder: "[CLS] prompt [SEP] response [SEP]" as a text pair with segment ids, the cross-encoder input BERT
        was pretrained on; too long -> the longer side is cut (tokenizer "longest_first").
    """
    if backbone == "decoder":
        ids = encode_prompt(prompt + completion, tokenizer)
        if ids[-1] != tokenizer.eos_token_id:  # a chat template may have written the EOS already
            ids.append(tokenizer.eos_token_id)
        return Encoded(ids[-max_length:]), len(ids) > max_length
    if prompt:
        full = tokenizer(prompt, completion, truncation=False)["input_ids"]
        enc = tokenizer(prompt, completion, truncation="longest_first", max_length=max_length)
    else:
        full = tokenizer(completion, truncation=False)["input_ids"]
        enc = tokenizer(completion, truncation=True, max_length=max_length)
    return Encoded(enc["input_ids"], enc.get("token_type_ids")), len(full) > max_length


def pad_right(encoded: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences. Returns input_ids, attention_mask (and token_type_ids when present). Shape: (N, L)."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    types = torch.zeros((len(encoded), width), dtype=torch.long) if encoded[0].token_type_ids is not None else None
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if types is not None:
            types[i, :n] = torch.tensor(e.token_type_ids)
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


@dataclass
class TokenizedPair:
    chosen: Encoded
    rejected: Encoded
    margin: float
    label: float


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, backbone: str, max_length: int) -> list[TokenizedPair]:
    """Tokenize every pair for training; truncated pairs are counted in one warning."""
    out, truncated = [], 0
    for p in pairs:
        chosen, cut_c = encode_response(tokenizer, backbone, p.prompt, p.chosen, max_length)
        rejected, cut_r = encode_response(tokenizer, backbone, p.prompt, p.rejected, max_length)
        truncated += cut_c or cut_r
        out.append(TokenizedPair(chosen, rejected, p.margin, p.label))
    if truncated:
        log.warning("%d of %d pairs were longer than max_length=%d and were truncated", truncated, len(pairs), max_length)
    return out


def group_by_prompt(pairs: list[PreferencePair]) -> list[list[int]]:
    """Indices of consecutive pairs that share a prompt: one group per run of equal prompts, as a K-wise comparison
    file lists them (a prompt text that comes back later, e.g. a second sampling of it, starts a new group).

    Used to keep all comparisons of one prompt in the same batch (InstructGPT §3.5: each of a prompt's K responses
    is scored once for all C(K, 2) comparisons) and to hold out whole groups, so no response is in both sets.
    """
    groups: list[list[int]] = []
    for i, p in enumerate(pairs):
        if groups and pairs[groups[-1][-1]].prompt == p.prompt:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def collate_pairs(batch: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of the *distinct* sequences of `batch`, so each response is scored once however many
    pairs it is in (TRL's `DataCollatorForPreference` stacks chosen then rejected; with no repeated response this is
    exactly that layout).

    Returns input_ids / attention_mask (/ token_type_ids) of shape (U, L), U ≤ 2B distinct sequences, ordered with
    every sequence that is some pair's chosen response first (`lm_rows` of them, the rows the auxiliary LM loss
    reads); `chosen_index` / `rejected_index` (B,) rows of each pair's responses; `margin`, `label` (B,).
    """
    keys = [_key(p.chosen) for p in batch] + [_key(p.rejected) for p in batch]
    rows: dict[tuple, int] = {}
    encoded: list[Encoded] = []
    for key, enc in zip(keys, [p.chosen for p in batch] + [p.rejected for p in batch]):
        if key not in rows:
            rows[key] = len(encoded)
            encoded.append(enc)
    lm_rows = len({k for k in keys[: len(batch)]})  # chosen sequences were added first
    out = pad_right(encoded, pad_token_id)
    out["chosen_index"] = torch.tensor([rows[k] for k in keys[: len(batch)]])
    out["rejected_index"] = torch.tensor([rows[k] for k in keys[len(batch):]])
    out["margin"] = torch.tensor([p.margin for p in batch], dtype=torch.float32)
    out["label"] = torch.tensor([p.label for p in batch], dtype=torch.float32)
    out["lm_rows"] = torch.tensor(lm_rows)
    return out


def _key(enc: Encoded) -> tuple:
    return tuple(enc.input_ids), tuple(enc.token_type_ids or ())
