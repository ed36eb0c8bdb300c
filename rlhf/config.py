"""Typed configs: one pydantic model per stage, loaded from YAML plus dotted `key=value` overrides.

Every section forbids unknown keys; a bad key is reported with the nearest valid one, a bad value with the key and
the expected type (`UserError`, exit code 2). Paths inside configs are relative to the working directory.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlhf.errors import UserError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, no number is NaN or
    infinite, and a boolean is never taken as a number (`train.max_steps: true` is not 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info) -> Any:
        if isinstance(value, bool) and _numeric_only(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number, not a boolean")
        return value


def _numeric_only(annotation: Any) -> bool:
    """int / float (or either | None): a field where a YAML boolean can only be a mistake."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in (typing.get_args(annotation) if is_union else (annotation,)) if a is not type(None)]
    return bool(args) and all(a in (int, float) for a in args)


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class LoraSettings(Section):
    """LoRA adapters through peft; the frozen base weights double as the reference policy."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: int = Field(16, ge=1, description="scaling numerator: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[str] | str = Field("all-linear", description="module names to adapt, or 'all-linear'")


class ModelSettings(Section):
    """Where the policy comes from: a Hugging Face causal LM directory / hub id, or a fresh demo-world model."""

    path: str | None = Field(None, description="local directory or hub id of a causal LM")
    tokenizer: str | None = Field(None, description="tokenizer directory or hub id; defaults to `path`")
    scratch_size: str | None = Field(
        None, description="build a randomly initialised demo-world Llama of this size (nano|tiny|small) instead of loading `path`"
    )
    ref_path: str | None = Field(None, description="reference policy weights when not using LoRA; defaults to `path`")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights dtype")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of all weights")
    value_head: bool = Field(False, description="add a scalar value head on the trunk (PPO)")
    vision_tower: str | None = Field(
        None, description="a saved ViT / CLIP vision directory: build a LLaVA-style vision-language model of it, a "
        "fresh projector and the causal LM at `path`")
    freeze_vision_tower: bool = Field(False, description="a vision-language model's vision tower does not train")


class OptimSettings(Section):
    """AdamW with warmup and a decay schedule."""

    lr: float = Field(1e-3, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup length in optimizer steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="clip the global gradient norm; null = no clipping")


class LoopSettings(Section):
    """The loop every stage shares: length, precision and the cadence of logging, evaluation and checkpoints."""

    max_steps: int = Field(100, ge=1, description="steps (an RL step = one rollout and its updates)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="autocast precision")
    log_every: int = Field(10, ge=1, description="log training metrics every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end)")
    save_every: int = Field(0, ge=0, description="write a resumable checkpoint every N steps (0 = never)")
    keep_checkpoints: int = Field(1, ge=1, description="how many resumable checkpoints to keep")


class TrainSettings(LoopSettings):
    """The supervised loop (pretrain, sft, reward): the shared loop plus batch size and gradient accumulation."""

    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")


class GenerationSettings(Section):
    """Decoding for gold evaluation: greedy (a property of the weights) and, with `samples` > 0, also sampled at
    `temperature` (the distribution RL actually trains: mean accuracy and pass@k over `samples` per prompt)."""

    max_new_tokens: int = Field(48, ge=1, description="response budget")
    batch_size: int = Field(64, ge=1, description="prompts per generate call")
    samples: int = Field(0, ge=0, description="sampled evaluation: completions per prompt (0 = greedy only)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the sampled evaluation")
    backend: Literal["hf", "fast"] = Field(
        "fast", description="sampler: fast = rlhf.generation's KV-cache decode loop (Llama / Qwen2; others fall back to hf), "
        "hf = transformers' generate")


class SamplingSettings(Section):
    """How an RL stage samples its rollouts (the same temperature is used to recompute log-probs in training)."""

    n: int = Field(8, ge=1, description="completions per prompt (GRPO's group size G)")
    max_new_tokens: int = Field(48, ge=1, description="response budget; a completion without EOS by then is truncated")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (also used for training log-probs)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0 = off)")
    backend: Literal["hf", "fast"] = Field(
        "fast", description="sampler: fast = rlhf.generation's KV-cache decode loop (Llama / Qwen2; others fall back to hf), "
        "hf = transformers' generate")
    bf16: bool = Field(False, description="fast backend: sample with bfloat16 weights and KV cache (faster at large batches; "
                       "the sampling distribution then differs slightly from the fp32 log-probs trained on)")


class AsyncSettings(Section):
    """`rl.asynchronous`: sample in a separate worker process, at most `max_staleness` updates behind the trainer
    (`rlhf.async_rollouts`)."""

    max_staleness: int = Field(1, ge=0, description="k: step s samples with the weights of step s − k (0 = synchronous)")
    importance_cap: float = Field(2.0, gt=0.0, description="truncate π_prox / π_behav of stale samples at this (TIS)")
    worker_threads: int = Field(1, ge=1, description="torch threads of the rollout worker")
    timeout_seconds: float = Field(600.0, gt=0.0, description="a worker silent this long on one rollout counts as hung")
    max_restarts: int = Field(2, ge=0, description="restart a dead worker this many times before the stage stops")


class EarlyStopSettings(Section):
    """Stop an RL stage on a signal every step logs without gold (e.g. a reward-model ensemble's disagreement, or a
    conservative reward), keeping the policy of its best step: a guard against over-optimizing the reward model."""

    metric: str = Field("reward/rm_disagreement", description="a step metric (e.g. reward/<name>_disagreement of "
                        "an ensemble reward, train/reward)")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (disagreement); max: higher")
    patience: int = Field(4, ge=1, description="stop after this many steps without a better (smoothed) value")
    smoothing: float = Field(0.5, ge=0, lt=1, description="EMA weight of the past: s_t = a·s_{t-1} + (1 − a)·x_t")
    min_delta: float = Field(0.0, ge=0, description="an improvement smaller than this does not count")
    warmup_steps: int = Field(0, ge=0, description="steps before the signal counts (the first values are noisy)")


class RLSettings(Section):
    """The shape of one RL step: rollout size, update epochs (μ) and minibatches, micro-batches for memory."""

    prompts_per_step: int = Field(16, ge=1, description="prompts sampled per step (per process); rows = prompts × sampling.n")
    epochs: int = Field(1, ge=1, description="μ: passes over each rollout (> 1 reuses it off-policy with the clipped ratio)")
    minibatches: int = Field(1, ge=1, description="optimizer steps per epoch; the rollout is split into this many shuffled parts")
    micro_batch_size: int = Field(64, ge=1, description="rows per forward/backward pass (gradient accumulation inside a minibatch)")
    asynchronous: AsyncSettings | None = Field(
        None, description="grpo: sample in a worker process with weights up to max_staleness steps old (null = in the loop)")
    early_stop: EarlyStopSettings | None = Field(
        None, description="stop on a gold-free signal and keep the best step's policy (null = run to max_steps)")


class TrackingSettings(Section):
    """Weights & Biases plus metrics.jsonl (always written)."""

    mode: Literal["auto", "offline", "online", "disabled"] = Field(
        "auto", description="auto = online when WANDB_API_KEY is set, else offline"
    )
    project: str = Field("rlhf", description="W&B project")
    group: str | None = Field(None, description="W&B group; a pipeline sets it to its name")
    run_name: str | None = Field(None, description="W&B run name; defaults to the stage name")
    job_type: str | None = Field(None, description="W&B job_type; defaults to the stage kind (`rlhf compare`: the algorithm)")
    run_config: dict[str, Any] = Field(
        default_factory=dict, description="extra top-level W&B run config (`rlhf compare`: algorithm, seed, β, budget)")


class StageConfig(Section):
    """Fields every stage has. A stage's own config subclasses this."""

    seed: int = Field(0, ge=0, lt=2**32, description="seed for data order, init and sampling (0 ≤ seed < 2³²)")
    output_dir: str = Field("runs/stage", description="where the stage writes its artifacts")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="experiment tracking")

    def fingerprint(self, wired: Iterable[str] = (), processes: int = 1) -> str:
        """Hash of everything that changes the stage's result (tracking and output location do not).

        `wired` keys hold an earlier stage's directory: the path is left out (a pipeline moved to another
        output_dir is the same pipeline) and that stage's own fingerprint is hashed in by the runner instead.
        Batches count globally over the `processes` of the run: only the global batch (batch_size × grad_accum ×
        processes, prompts_per_step × processes) is hashed, not how it is split into micro-batches and processes,
        so a run interrupted on two processes resumes on one with the same global batch, and the reverse.
        """
        payload = self.model_dump(mode="json", exclude={"tracking", "output_dir"})
        train, rl = payload.get("train"), payload.get("rl")
        if isinstance(train, dict) and "batch_size" in train:
            train["global_batch"] = train.pop("batch_size") * train.pop("grad_accum", 1) * processes
        if isinstance(rl, dict) and "prompts_per_step" in rl:
            rl["prompts_per_step"] *= processes
            rl.pop("micro_batch_size", None)
        for key in wired:
            set_dotted(payload, key, "<input>")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "model.lora=null"]` -> `{"train.lr": 1e-4, "model.lora": None}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
        except RecursionError:
            raise UserError(f"override {key.strip()!r}: nested too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
        check_shape(out[key.strip()], f"override {key.strip()!r}")
    return out


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for key "a.b", creating sub-dicts on the way. A number indexes into an existing
    list: "rewards.0.model" sets the `model` of the first reward component."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, key)
            continue
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], (dict, list)):  # `train: 5` is an error, whatever the command line adds
            head = ".".join(parts[:i + 1])
            raise UserError(f"config key '{head}' is {short_repr(node[part])}, not a mapping of keys, so '{key}' "
                            "cannot be set in it")
        node = node[part]
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key)] = value
    else:
        node[parts[-1]] = value


def _list_index(items: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise UserError(f"config key '{key}': '{part}' is not an index of a list of {len(items)} items")
    return int(part)


def _list_item(items: list, part: str, key: str) -> Any:
    item = items[_list_index(items, part, key)]
    if not isinstance(item, dict):
        raise UserError(f"config key '{key}': item {part} is not a mapping")
    return item


def read_text_file(path: str | Path) -> str:
    """A text file's content as UTF-8 (a leading BOM is dropped). Anything else is a `UserError` naming the file and
    the line: a binary file, a UTF-16 one, one invalid byte."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{path}: the file is UTF-16/32 encoded; save it as UTF-8")
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (a NUL byte: a binary or UTF-16 file); save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
                        "save it as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # keys merged from `<<: *anchor` may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, typing.Hashable):  # the base class reports it
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (first on line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.load(read_text_file(path), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply (a config has at most {MAX_CONFIG_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    check_shape(data, str(path))
    return data


MAX_CONFIG_DEPTH = 50  # far more than any config needs, far less than what overflows the stack of yaml / pydantic
MAX_CONFIG_VALUES = 100_000  # values once YAML aliases are expanded: an alias bomb expands to billions


def check_shape(data: Any, where: str) -> None:
    """Refuse a loaded config that is nested too deeply, that refers to itself, or whose YAML aliases expand past
    `MAX_CONFIG_VALUES` values (validation, error messages and saving would all expand them). Aliased nodes are
    measured once, so this takes time in the size of the file, not of its expansion."""
    if not isinstance(data, (dict, list)):
        return
    measured: dict[int, tuple[int, int]] = {}  # id of a container -> (values, levels) once expanded
    open_: set[int] = set()
    stack: list[tuple[Any, str | None, bool]] = [(data, None, False)]
    while stack:
        node, top, done = stack.pop()
        children = [c for c in (node.values() if isinstance(node, dict) else node) if isinstance(c, (dict, list))]
        under = f" (under key '{top}')" if top is not None else ""
        if done:
            open_.discard(id(node))
            size = len(node) + 1 + sum(measured[id(c)][0] - 1 for c in children)
            levels = 1 + max((measured[id(c)][1] for c in children), default=0)
            if size > MAX_CONFIG_VALUES:
                raise UserError(f"{where}: YAML aliases expand to more than {MAX_CONFIG_VALUES:,} values{under}; "
                                "write the values out instead")
            if levels > MAX_CONFIG_DEPTH:
                raise UserError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep{under}")
            measured[id(node)] = (size, levels)
        elif id(node) in open_:
            raise UserError(f"{where}: a YAML alias refers to a node that contains it{under}")
        elif id(node) not in measured:
            open_.add(id(node))
            stack.append((node, top, True))
            keys = [str(k) for k in node] if isinstance(node, dict) else [None] * len(node)
            for key, child in zip(keys, node.values() if isinstance(node, dict) else node):
                if isinstance(child, (dict, list)):
                    stack.append((child, top if top is not None else key, False))


def valid_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """All dotted keys a schema accepts, descending into nested sections."""
    keys = []
    for name, field in schema.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        for sub in _section_types(field.annotation):
            keys.extend(valid_keys(sub, dotted + "."))
    return keys


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for t in typing.get_args(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
    return []


def nearest_key(key: str, candidates: list[str]) -> str | None:
    """The valid key closest to `key` (whole dotted key first, then its last part)."""
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if match:
        return match[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)
    return by_leaf[match[0]] if match else None


def validate(schema: type[Section], data: dict, source: str = "config") -> Section:
    """Validate a dict against a schema, turning the first pydantic error into one readable `UserError`."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = nearest_key(key, valid_keys(schema))
            suggestion = f" (did you mean '{hint}'?)" if hint else ""
            raise UserError(f"{source}: unknown config key '{key}'{suggestion}") from None
        if err["type"] in ("model_type", "model_attributes_type"):  # `train: 5`
            sub = next((k for k in valid_keys(schema) if k.startswith(key + ".")), None)
            example = f" such as '{sub}'" if sub else ""
            raise UserError(
                f"{source}: config key '{key}' is a section: give it a mapping of keys{example}; got {short_repr(err.get('input'))}"
            ) from None
        expected = _expected_type(schema, key)
        if err["type"] == "literal_error":  # `dtype: bogus`: the closest of the allowed values
            allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
            match = difflib.get_close_matches(str(err.get("input")), allowed, n=1, cutoff=0.0)
            expected = f" (did you mean '{match[0]}'?)" if match else expected
        msg = err["msg"].removeprefix("Value error, ").lower()
        raise UserError(f"{source}: config key '{key}' {msg}{expected}; got {short_repr(err.get('input'))}") from None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def short_repr(value: Any) -> str:
    """A repr cut to a few dozen characters (an expanded alias bomb has billions; an error line shows a glimpse)."""
    return _REPR.repr(value)


def _expected_type(schema: type[BaseModel], dotted: str) -> str:
    node: Any = schema
    field = None
    for part in dotted.split("."):
        sections = _section_types(node) if not (isinstance(node, type) and issubclass(node, BaseModel)) else [node]
        field = next((s.model_fields[part] for s in sections if part in s.model_fields), None)
        if field is None:
            return ""
        node = field.annotation
    name = getattr(node, "__name__", None) or str(node).replace("typing.", "")
    return f" (expected {name})"


def load_config(schema: type[Section], path: str | Path | None, overrides: dict[str, Any] | None = None) -> Section:
    """Read `path` (YAML), apply dotted overrides, validate into `schema`.

    Without a file the overrides apply on top of the schema's defaults (`rlhf pretrain model.scratch_size=nano`
    keeps the default tokenizer); a YAML section replaces the default section as a whole.
    """
    data = read_yaml(path) if path is not None else _defaults(schema)
    source = str(path) if path is not None else "config"
    for key, value in (overrides or {}).items():
        try:
            set_dotted(data, key, value)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None
    return validate(schema, data, source=source)


def _defaults(schema: type[Section]) -> dict:
    try:
        return schema().model_dump(mode="json")
    except ValidationError:  # the schema has required fields
        return {}


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (stage artifacts carry the exact config that made them)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
