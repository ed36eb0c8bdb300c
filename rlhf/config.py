"""Typed configs: one pydantic model per stage, loaded from YAML plus dotted `key=value` overrides.

Every section forbids unknown keys; a bad key is reported with the nearest valid one, a bad value with the key and
the expected type (`UserError`, exit code 2). Paths inside configs are relative to the working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf.errors import UserError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LoraSettings(Section):
    """LoRA adapters through peft; the frozen base weights double as the reference policy."""

    r: int = Field(8, description="adapter rank")
    alpha: int = Field(16, description="scaling numerator: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, description="dropout on the adapter input")
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


class OptimSettings(Section):
    """AdamW with warmup and a decay schedule."""

    lr: float = Field(1e-3, description="peak learning rate")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    warmup_steps: int = Field(0, description="linear warmup length in optimizer steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    max_grad_norm: float | None = Field(1.0, description="clip the global gradient norm; null = no clipping")


class TrainSettings(Section):
    """The training loop shared by pretrain and sft."""

    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="autocast precision")
    log_every: int = Field(10, ge=1, description="log training metrics every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end)")
    save_every: int = Field(0, ge=0, description="write a resumable checkpoint every N steps (0 = never)")
    keep_checkpoints: int = Field(1, ge=1, description="how many resumable checkpoints to keep")


class TrackingSettings(Section):
    """Weights & Biases plus metrics.jsonl (always written)."""

    mode: Literal["auto", "offline", "online", "disabled"] = Field(
        "auto", description="auto = online when WANDB_API_KEY is set, else offline"
    )
    project: str = Field("rlhf", description="W&B project")
    group: str | None = Field(None, description="W&B group; a pipeline sets it to its name")
    run_name: str | None = Field(None, description="W&B run name; defaults to the stage name")


class StageConfig(Section):
    """Fields every stage has. A stage's own config subclasses this."""

    seed: int = Field(0, description="seed for data order, init and sampling")
    output_dir: str = Field("runs/stage", description="where the stage writes its artifacts")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="experiment tracking")

    def fingerprint(self, wired: Iterable[str] = ()) -> str:
        """Hash of everything that changes the stage's result (tracking and output location do not).

        `wired` keys hold an earlier stage's directory: the path is left out (a pipeline moved to another
        output_dir is the same pipeline) and that stage's own fingerprint is hashed in by the runner instead.
        """
        payload = self.model_dump(mode="json", exclude={"tracking", "output_dir"})
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
    return out


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for key "a.b", creating sub-dicts on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


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
        expected = _expected_type(schema, key)
        raise UserError(
            f"{source}: config key '{key}' {err['msg'].lower()}{expected}; got {err.get('input')!r}"
        ) from None


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
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate(schema, data, source=str(path) if path is not None else "config")


def _defaults(schema: type[Section]) -> dict:
    try:
        return schema().model_dump(mode="json")
    except ValidationError:  # the schema has required fields
        return {}


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (stage artifacts carry the exact config that made them)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
