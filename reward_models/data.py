"""Preference data: loading, validation, tokenization and collation.

Accepted rows follow TRL's preference formats (https://huggingface.co/docs/trl/dataset_formats#preference):

    standard, explicit prompt      {"prompt": "...", "chosen": "...", "rejected": "..."}
    standard, implicit prompt      {"chosen": "<prompt + response>", "rejected": "<prompt + response>"}
    conversational, explicit       {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], ...}
    conversational, implicit       {"chosen": [<whole conversation>], "rejected": [<whole conversation>]}

plus two optional fields: `margin` (float, the score gap the pair should have, Llama 2 §3.2.2; TRL reads it too)
and `tie` (bool, the annotator saw no difference; trained with the symmetric loss for label ½). A pair about an image
carries it in `images` (TRL's vision preference format: prompt / chosen / rejected / images; file paths relative to
the row's file, one image per pair, its place in the prompt marked by `rlhf.vision.IMAGE_TOKEN`). Any other field
(`task`, `meta`, ...) rides along untouched. Rows come from `rlhf.data.load_records` (JSONL, parquet, a
`datasets.save_to_disk` directory or a hub id), so every error names `file:line` and the field.

Implicit prompts (no `prompt`, or an empty one) are split off the two responses as TRL's `extract_prompt` does, at
the last turn boundary both responses share (`split_implicit_prompt`): conversation transcripts in text
(`"\n\nHuman: ...\n\nAssistant: ..."`, the form of several published preference sets) end their prompt with the
last `"\n\nAssistant:"` both share; message lists keep their common leading messages up to the last assistant turn
both share. So the held-out split by prompt, truncation and an encoder's (prompt, response) text pair all see the
real prompt.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.data import Record, encode_prompt, load_records
from rlhf.errors import UserError
from rlhf.vision import IMAGE_FIELDS, check_image_prompts, message_text, record_images

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    """One validated pair, with conversations already rendered to text (an implicit prompt already split off)."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    tie: bool = False
    origin: str = "?"
    extra: dict = field(default_factory=dict)  # the row's other fields (task, meta, ...)
    images: list = field(default_factory=list)  # the prompt's images (RGB PIL), from the row's `images` column
    image_key: str = ""  # a digest of the images' pixels: which image the prompt shows ("" = none)

    @property
    def label(self) -> float:
        """P(chosen wins) the loss fits: 1.0 for a strict preference, 0.5 for a tie."""
        return 0.5 if self.tie else 1.0


def image_digest(images: list) -> str:
    """A key of PIL images by their pixels: the same picture is the same prompt, whichever file holds it."""
    if not images:
        return ""
    digest = hashlib.sha1()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def check_pair_images(pairs: list[PreferencePair], image_inputs, model_name: str) -> None:
    """Every pair fits the model (`rlhf.vision.check_image_prompts`): a text-only model takes no image, a
    vision-language one (`image_inputs`) one image per pair, marked once in the prompt. Errors name file:line and
    the field."""
    check_image_prompts([Record.at({"prompt": p.prompt, "images": p.images}, p.origin) for p in pairs],
                        image_inputs, model_name)


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
    implicit = not record.get("prompt")
    for name in ("chosen", "rejected"):  # an implicit-prompt field holds prompt + response: it must not be blank
        if implicit and kinds[name] == "text" and not record[name].strip():
            raise UserError(f"{record.origin}: field '{name}' is an empty response")
    fields = {"prompt": record.get("prompt") or "", "chosen": record["chosen"], "rejected": record["rejected"]}
    if implicit:
        fields = dict(zip(("prompt", "chosen", "rejected"), split_implicit_prompt(record["chosen"], record["rejected"])))
    if kinds["chosen"] == "conversation":
        # TRL's typed content parts (text and image) as text, the image part as its placeholder
        fields = {k: [{**m, "content": message_text(m["content"])} for m in v] if isinstance(v, list) else v
                  for k, v in fields.items()}
        prompt, chosen, rejected = _render_conversation(fields, record.origin, tokenizer)
    else:
        prompt, chosen, rejected = fields["prompt"], fields["chosen"], fields["rejected"]
    if not implicit:  # a split-off response may be empty: the assistant said nothing, which annotators compared
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
    extra = {k: v for k, v in record.items()
             if k not in ("prompt", "chosen", "rejected", "margin", "tie", *IMAGE_FIELDS)}
    images = record_images(record)  # opened now: a missing or unreadable file is an error naming the row
    return PreferencePair(prompt, chosen, rejected, float(margin), tie, record.origin, extra, images,
                          image_digest(images))


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


TRANSCRIPT_TURN = "\n\nAssistant:"  # where an assistant turn starts in a "\n\nHuman: ...\n\nAssistant: ..." transcript


def split_implicit_prompt(chosen: str | list[dict], rejected: str | list[dict]) -> tuple:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the shared start of both responses, cut at the last
    turn boundary both share, and the two remainders. TRL's `extract_prompt` semantics, at turn boundaries:

    text transcript: the prompt ends with the last "\n\nAssistant:" inside the common prefix, so each response is
        the rest of the text (" I can help ...", including any later turns of that branch);
    other text: the common prefix, backed off to the last whitespace so no word is split (the response keeps the
        leading space; no whitespace in the common prefix: no prompt);
    message lists: the common leading messages, up to (not including) the last assistant message both responses
        have at one position: [user, assistant_c] vs [user, assistant_r] -> [user], [assistant_c], [assistant_r].

    A response may come out empty when one side is a prefix of the other (the assistant's turn is empty).
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str):
        shared = chosen[:n]
        turn = shared.rfind(TRANSCRIPT_TURN)
        if turn >= 0:
            end = turn + len(TRANSCRIPT_TURN)
        else:
            end = max((i for i, c in enumerate(shared) if c.isspace()), default=0)
            while end > 0 and shared[end - 1].isspace():  # a run of whitespace goes to the response whole
                end -= 1
    else:
        both = [i for i in range(min(len(chosen), len(rejected)))
                if i <= n and chosen[i]["role"] == "assistant" and rejected[i]["role"] == "assistant"]
        end = both[-1] if both else n
    return chosen[:end], chosen[end:], rejected[end:]


def _render_conversation(fields: dict, origin: str, tokenizer) -> tuple[str, str, str]:
    """Conversation -> (prompt, chosen, rejected) text. With a chat template this is TRL's own
    `maybe_apply_chat_template` (prompt rendered with the generation prompt, responses as the continuation);
    without one (e.g. a BERT encoder) each message becomes a "role: content" line."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from trl.data_utils import maybe_apply_chat_template

        row = {"chosen": fields["chosen"], "rejected": fields["rejected"]}
        if fields["prompt"]:
            row["prompt"] = fields["prompt"]
        try:
            out = maybe_apply_chat_template(row, tokenizer)
        except Exception as exc:  # jinja raises its own types for malformed messages
            raise UserError(f"{origin}: chat template failed on this conversation ({exc})") from None
        return out.get("prompt", ""), out["chosen"], out["rejected"]

    def lines(messages: list[dict]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    prompt = lines(fields["prompt"]) if fields["prompt"] else ""
    joiner = "\n" if prompt else ""
    return prompt, joiner + lines(fields["chosen"]), joiner + lines(fields["rejected"])


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and collation


@dataclass
class Encoded:
    """One scored sequence: token ids and, for encoders fed a (prompt, response) text pair, segment ids; for a
    vision-language reward model the prompt's image (PIL, turned into pixel values when a batch is collated)."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None
    image: Any = None


PROMPT_FLOOR = 0.25  # share of an encoder's token budget kept for the end of the prompt when the response is long


@dataclass(frozen=True)
class Truncation:
    """Tokens one scored sequence lost to max_length: from the start of the prompt and from the response.
    Falsy when nothing was cut."""

    prompt: int = 0
    response: int = 0

    def __bool__(self) -> bool:
        return bool(self.prompt or self.response)


def encode_response(tokenizer, backbone: str, prompt: str, completion: str, max_length: int, image_inputs=None,
                    image=None) -> tuple[Encoded, Truncation]:
    """Tokenize what the reward model reads for one (prompt, response). Returns (encoded, what was cut).

    Both backbones keep the end of the prompt (the latest turns, the context that matters most) and the whole
    response when it fits:
    decoder: BOS + prompt + response + EOS as one sequence (TRL `RewardTrainer` appends EOS the same way), so the
        score is read at the EOS. Too long -> the oldest tokens are dropped: the score head reads the end; a
        response longer than max_length loses its start.
    encoder: "[CLS] prompt [SEP] response [SEP]" as a text pair with segment ids, the cross-encoder input BERT
        was pretrained on. Too long -> the prompt is cut from the left; a response too long to fit beside the last
        `PROMPT_FLOOR` of the budget's worth of prompt tokens is cut from the right to make room for them.
    vision-language decoder (`image_inputs`, `rlhf.vision.ImageInputs`): the prompt's image placeholder becomes the
        model's image tokens first (they count in max_length) and `image` rides along; a cut may not reach them (the
        image's features need every one of its tokens), which is an error naming max_length.
    """
    if backbone == "decoder":
        if image_inputs is not None:
            prompt = image_inputs.expand(prompt)
        ids = encode_prompt(prompt + completion, tokenizer)
        if ids[-1] != tokenizer.eos_token_id:  # a chat template may have written the EOS already
            ids.append(tokenizer.eos_token_id)
        over = len(ids) - max_length
        if over <= 0:
            return Encoded(ids, image=image), Truncation()
        n_prompt = len(encode_prompt(prompt, tokenizer))  # with BOS; the prompt / response seam is approximate
        kept = ids[-max_length:]
        if image_inputs is not None:
            image_id = tokenizer.convert_tokens_to_ids(image_inputs.token)
            if kept.count(image_id) < ids.count(image_id):
                raise UserError(f"the prompt's image ({image_inputs.tokens_per_image} tokens) and the response do not "
                                f"fit max_length={max_length} tokens ({len(ids)} needed); raise the max_length")
        return Encoded(kept, image=image), Truncation(min(over, n_prompt), max(0, over - n_prompt))
    if not prompt:
        full = tokenizer(completion, truncation=False)
        over = len(full["input_ids"]) - max_length
        if over <= 0:
            return Encoded(full["input_ids"], full.get("token_type_ids")), Truncation()
        enc = tokenizer(completion, truncation=True, max_length=max_length)
        return Encoded(enc["input_ids"], enc.get("token_type_ids")), Truncation(0, over)
    full = tokenizer(prompt, completion, truncation=False, return_special_tokens_mask=True)
    ids, types = full["input_ids"], full.get("token_type_ids")
    if len(ids) <= max_length:
        return Encoded(ids, types), Truncation()
    if full.encodings is not None:  # a fast tokenizer says which text each token came from
        side = full.sequence_ids(0)  # 0 prompt, 1 response, None special tokens
    else:  # a python one: the prompt's own tokens come first, then the response's, between special tokens
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        order = iter(range(len(ids)))
        side = [None if special else (0 if next(order) < n_prompt else 1) for special in full["special_tokens_mask"]]
    n_prompt, n_response = side.count(0), side.count(1)
    budget = max_length - side.count(None)
    keep_response = min(n_response, budget - min(n_prompt, int(budget * PROMPT_FLOOR)))
    keep_prompt = min(n_prompt, budget - keep_response)
    keep, seen = [], {0: 0, 1: 0}
    for i, s in enumerate(side):
        if s is not None:
            seen[s] += 1
        if s is None or (s == 0 and seen[0] > n_prompt - keep_prompt) or (s == 1 and seen[1] <= keep_response):
            keep.append(i)
    encoded = Encoded([ids[i] for i in keep], None if types is None else [types[i] for i in keep])
    return encoded, Truncation(n_prompt - keep_prompt, n_response - keep_response)


def pad_right(encoded: list[Encoded], pad_token_id: int, image_inputs=None) -> dict[str, torch.Tensor]:
    """Right-pad sequences. Returns input_ids, attention_mask (and token_type_ids when present), shape (N, L); with
    `image_inputs` (a vision-language reward model) each sequence's image as pixel_values (N, C, H, W)."""
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
    if image_inputs is not None:
        batch["pixel_values"] = image_inputs.pixel_values([e.image for e in encoded])
    return batch


@dataclass
class TokenizedPair:
    chosen: Encoded
    rejected: Encoded
    margin: float
    label: float


@dataclass
class TruncationReport:
    """What max_length cut from a set of pairs: pairs with any sequence cut, pairs whose prompt lost its start (in
    either response's sequence), and responses (two per pair) that had to be cut themselves."""

    pairs: int = 0
    max_length: int = 0
    truncated_pairs: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0

    def add(self, chosen: Truncation, rejected: Truncation) -> None:
        self.pairs += 1
        self.truncated_pairs += bool(chosen or rejected)
        self.prompts_cut += bool(chosen.prompt or rejected.prompt)
        self.responses_cut += bool(chosen.response) + bool(rejected.response)

    def summary(self) -> str:
        return (f"{self.truncated_pairs} of {self.pairs} pairs longer than max_length={self.max_length}: "
                f"{self.prompts_cut} prompts cut from the left, {self.responses_cut} of {2 * self.pairs} responses cut")

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        return {f"{prefix}truncated_pairs": float(self.truncated_pairs), f"{prefix}prompts_cut": float(self.prompts_cut),
                f"{prefix}responses_cut": float(self.responses_cut)}


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, backbone: str, max_length: int,
                   image_inputs=None) -> tuple[list[TokenizedPair], TruncationReport]:
    """Tokenize every pair for training (with `image_inputs`, each with its image: `encode_response`). Returns the
    pairs and what truncation cut (`TruncationReport.summary()`)."""
    out, report = [], TruncationReport(max_length=max_length)
    for p in pairs:
        image = p.images[0] if image_inputs is not None else None
        try:
            chosen, cut_c = encode_response(tokenizer, backbone, p.prompt, p.chosen, max_length, image_inputs, image)
            rejected, cut_r = encode_response(tokenizer, backbone, p.prompt, p.rejected, max_length, image_inputs, image)
        except UserError as exc:
            raise UserError(f"{p.origin}: {exc}") from None
        report.add(cut_c, cut_r)
        out.append(TokenizedPair(chosen, rejected, p.margin, p.label))
    return out, report


def group_by_prompt(pairs: list[PreferencePair]) -> list[list[int]]:
    """Indices of consecutive pairs that share a prompt: one group per run of equal prompts, as a K-wise comparison
    file lists them (a prompt text that comes back later, e.g. a second sampling of it, starts a new group). An
    image prompt is its text and its image: "<review> <image>" about a tent and about a lamp are two prompts.

    Used to keep all comparisons of one prompt in the same batch (InstructGPT §3.5: each of a prompt's K responses
    is scored once for all C(K, 2) comparisons) and to hold out whole groups, so no response is in both sets.
    """
    groups: list[list[int]] = []
    for i, p in enumerate(pairs):
        last = pairs[groups[-1][-1]] if groups else None
        if last is not None and (last.prompt, last.image_key) == (p.prompt, p.image_key):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def split_by_prompt(pairs: list[PreferencePair], fraction: float, seed: int,
                    source: str = "pairs") -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held out): whole prompt groups (`group_by_prompt`) held out, `fraction` of them (at least one) in a
    seeded order. The reward and DPO stages both split this way, so the same seed and fraction hold out the same
    pairs and their held-out accuracies compare."""
    groups = group_by_prompt(pairs)
    if len(groups) < 2:
        raise UserError(f"{source}: all pairs share one prompt, so none can be held out by prompt; "
                        "pass held-out pairs as data.eval")
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = {i for g in order[: max(1, int(len(groups) * fraction))] for i in groups[g]}
    return ([p for i, p in enumerate(pairs) if i not in held_out], [p for i, p in enumerate(pairs) if i in held_out])


def collate_pairs(batch: list[TokenizedPair], pad_token_id: int, image_inputs=None) -> dict[str, torch.Tensor]:
    """One right-padded batch of the *distinct* sequences of `batch`, so each response is scored once however many
    pairs it is in (TRL's `DataCollatorForPreference` stacks chosen then rejected; with no repeated response this is
    exactly that layout).

    Returns input_ids / attention_mask (/ token_type_ids) of shape (U, L), U ≤ 2B distinct sequences, ordered with
    every sequence that is some pair's chosen response first (`lm_rows` of them, the rows the auxiliary LM loss
    reads); `chosen_index` / `rejected_index` (B,) rows of each pair's responses; `margin`, `label` (B,); with
    `image_inputs`, pixel_values (U, C, H, W): each sequence's image.
    """
    keys = [_key(p.chosen) for p in batch] + [_key(p.rejected) for p in batch]
    rows: dict[tuple, int] = {}
    encoded: list[Encoded] = []
    for key, enc in zip(keys, [p.chosen for p in batch] + [p.rejected for p in batch]):
        if key not in rows:
            rows[key] = len(encoded)
            encoded.append(enc)
    lm_rows = len({k for k in keys[: len(batch)]})  # chosen sequences were added first
    out = pad_right(encoded, pad_token_id, image_inputs)
    out["chosen_index"] = torch.tensor([rows[k] for k in keys[: len(batch)]])
    out["rejected_index"] = torch.tensor([rows[k] for k in keys[len(batch):]])
    out["margin"] = torch.tensor([p.margin for p in batch], dtype=torch.float32)
    out["label"] = torch.tensor([p.label for p in batch], dtype=torch.float32)
    out["lm_rows"] = torch.tensor(lm_rows)
    return out


def _key(enc: Encoded) -> tuple:
    # the image object itself: one pair's two sequences share it, and the same tokens about another image differ
    return tuple(enc.input_ids), tuple(enc.token_type_ids or ()), id(enc.image) if enc.image is not None else None
