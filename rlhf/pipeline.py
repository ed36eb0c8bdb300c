"""The staged runner: run one stage in its own directory, or a pipeline of stages in order.

A stage whose directory holds a complete artifact made from the same config (and the same inputs) is skipped;
an interrupted one resumes from its last checkpoint; a changed one reruns, and so does every stage after it.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import hashlib
import importlib
import importlib.util
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import Field, field_validator

from rlhf import stage as stage_dir
from rlhf.config import (
    Section, StageConfig, TrackingSettings, load_config, nearest_key, parse_overrides, read_yaml, save_config,
    set_dotted, validate,
)
from rlhf.distributed import process_state
from rlhf.errors import UserError
from rlhf.tracking import Tracker
from rlhf.training import NonFiniteError, latest_checkpoint, remove_checkpoints, usable_checkpoint

# stage kind -> the module of its recipe (exposes `Config` and `run(cfg, ctx)`), imported only when the stage runs
# (torchtune's recipe registry by path): `rlhf sft` never imports the web app. Adding a stage is one line here.
STAGES: dict[str, str] = {
    "pretrain": "rlhf.recipes.pretrain",
    "sft": "rlhf.recipes.sft",
    "reward": "reward_models.train",
    "grpo": "rlhf.recipes.grpo",
    "ppo": "rlhf.recipes.ppo",
    "dpo": "rlhf.recipes.dpo",
    "eval": "rlhf.recipes.evaluate",
    "collect": "rlhf.collect.stage",
    "world": "rlhf.recipes.world",
    "vit": "rlhf.recipes.vit",
    "loop": "rlhf.recipes.loop",
}


def recipe(kind: str) -> ModuleType:
    """The recipe module of a stage kind (imported on first use)."""
    if kind not in STAGES:
        hint = nearest_key(kind, list(STAGES))
        raise UserError(f"unknown stage kind '{kind}'" + (f" (did you mean '{hint}'?)" if hint else f"; known: {', '.join(STAGES)}"))
    return importlib.import_module(STAGES[kind])


def stage_help(kind: str) -> str:
    """The first line of the recipe's `Config` docstring, read from its source without importing it (so `rlhf
    --help` stays fast): '`rlhf sft`: fine-tune a causal LM on demonstrations.' -> 'fine-tune a causal LM ...'."""
    spec = importlib.util.find_spec(STAGES[kind])
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Config":
            doc = (ast.get_docstring(node) or "").splitlines()[0] if ast.get_docstring(node) else ""
            return doc.split(":", 1)[1].strip().rstrip(".") if doc.startswith("`") and ":" in doc else doc
    return ""


def run_stage(
    kind: str,
    cfg: StageConfig,
    *,
    name: str | None = None,
    input_fingerprints: dict[str, str] | None = None,
    overwrite: bool = False,
    force: bool = False,
    rerun: bool = False,
    debug: bool = False,
) -> dict[str, Any]:
    """Run (or skip, or resume) one stage into `cfg.output_dir`. Returns {"status", "fingerprint", "metrics"}.

    `overwrite` replaces whatever rlhf artifact is there; `rerun` (a pipeline) only this stage's own artifact made with
    another config; `force` reruns even an unchanged complete stage (see `stage.claim`).
    """
    module = recipe(kind)
    name = name or kind
    out = Path(cfg.output_dir)
    fingerprint = _combined_fingerprint(cfg, input_fingerprints or {})
    config = cfg.model_dump(mode="json")
    config.pop("output_dir", None)
    claim = {"stage": name, "kind": kind, "fingerprint": fingerprint, "overwrite": overwrite, "rerun": rerun,
             "inputs": stage_dir.input_paths(config)}
    decision = _claim_on_main(out, fresh=force, **claim)
    if decision == "complete":
        manifest = stage_dir.read_manifest(out)
        if _is_main_process():  # what a kill right after the stage completed left behind
            remove_checkpoints(out)
            stage_dir.remove_temporaries(out)
        print(f"[{name}] complete with an unchanged config: skipped ({out})")
        return {"status": "skipped", "fingerprint": fingerprint, "metrics": manifest.get("metrics", {})}

    resume_step = None
    if decision == "resume":
        decision, resume_step = _resume_from(out, claim)
    print(f"[{name}] {'resuming' if decision == 'resume' else 'running'} {kind} -> {out}")
    tracker = None
    try:
        if _is_main_process():
            stage_dir.atomic_write(out / stage_dir.CONFIG_FILE, lambda tmp: save_config(cfg, tmp))
        tracker = Tracker(out, cfg.tracking, job_type=kind, name=name, config=cfg.model_dump(mode="json"),
                          resume_step=resume_step, enabled=_is_main_process())
        ctx = stage_dir.StageContext(name=name, kind=kind, dir=out, tracker=tracker, resume=decision == "resume",
                                     debug=debug)
        started = time.monotonic()
        metrics = module.run(cfg, ctx)
    except BaseException as exc:
        if _is_main_process():
            with contextlib.suppress(OSError):  # on a full disk the manifest stays `running`: resumable all the same
                stage_dir.finish(out, stage=name, kind=kind, fingerprint=fingerprint, status="failed")
        if tracker is not None:
            tracker.finish()
        # say what is left on disk: no model, the last good checkpoint
        ckpt = latest_checkpoint(out)
        kept = f"its last good checkpoint {ckpt} is kept" if ckpt else "it wrote no checkpoint (train.save_every)"
        if isinstance(exc, NonFiniteError):
            raise NonFiniteError(f"stage '{name}': {exc}; the stage is marked failed and no model was saved; {kept}") from exc
        if (failure := _write_failure(exc)) is not None:
            raise UserError(f"stage '{name}': {failure}; the stage is marked failed and {kept}; free space and rerun "
                            "the same command to resume") from exc
        raise
    metrics = {k: float(v) for k, v in metrics.items()}
    if _is_main_process():
        stage_dir.finish(
            out, stage=name, kind=kind, fingerprint=fingerprint, status="complete", metrics=metrics,
            inputs=input_fingerprints or {}, seconds=round(time.monotonic() - started, 2),
        )
        remove_checkpoints(out)  # after `complete`: a kill while deleting them leaves no half checkpoint to resume
    tracker.summary(metrics)
    tracker.finish()
    if _is_main_process():
        stage_dir.remove_temporaries(out)
    return {"status": "ran", "fingerprint": fingerprint, "metrics": metrics}


def _resume_from(out: Path, claim: dict) -> tuple[str, int | None]:
    """(decision, step) for an interrupted stage: the step of its newest usable checkpoint (None: from the start);
    with `overwrite`, a stage none of whose checkpoints is usable starts over."""
    try:
        ckpt = usable_checkpoint(out)
    except UserError:
        if not claim["overwrite"]:
            raise
        print(f"[{claim['stage']}] no checkpoint is usable: --overwrite starts the stage over")
        return _claim_on_main(out, fresh=True, **claim), None
    if _is_main_process():
        stage_dir.remove_temporaries(out)  # what the killed attempt was writing
    return "resume", int(ckpt.name.split("-")[-1]) if ckpt is not None else None


def _write_failure(exc: BaseException) -> str | None:
    """What a failed write says in one line (a full disk, a quota), or None when `exc` is something else. torch
    reports a full disk as a RuntimeError of its zip writer."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''})"
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in str(exc) or "inline_container" in str(exc)):
        return f"torch could not write a file ({str(exc).strip().splitlines()[0][:200]}): is the disk full?"
    return None


def _is_main_process() -> bool:
    return process_state().is_main_process


def _claim_on_main(out: Path, **kwargs) -> str:
    """Only the main process touches the directory (under `accelerate launch` every process runs this code);
    the others wait and receive its decision."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    decision: list = [None]
    if state.is_main_process:
        try:
            decision = [stage_dir.claim(out, **kwargs)]
        except UserError as exc:  # every process must fail, not wait forever for the broadcast
            decision = [exc]
    if state.num_processes > 1:
        broadcast_object_list(decision, from_process=0)
    if isinstance(decision[0], UserError):
        raise decision[0]
    return decision[0]


def _combined_fingerprint(cfg: StageConfig, inputs: dict[str, str]) -> str:
    """The config's own hash plus its inputs' hashes: a retrained upstream stage invalidates this one."""
    parts = [cfg.fingerprint(wired=inputs, processes=process_state().num_processes)]
    parts += [f"{k}={v}" for k, v in sorted(inputs.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Pipelines


STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class StageSpec(Section):
    name: str = Field(description="unique stage name (letters, digits, _ and -); also its directory under output_dir")
    kind: str = Field(description="which recipe runs: pretrain | sft | eval | ...")
    config: str | None = Field(None, description="the stage's YAML config (null = the recipe's defaults)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value applied on top of config")
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="dotted config key -> earlier stage whose output directory fills it ('collect/preferences' = a path inside it)",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # the name is a directory under output_dir and the head of `<stage>.<key>=value` overrides
        if not STAGE_NAME.fullmatch(name):
            raise ValueError("must be a plain name of at most 64 letters, digits, '_' or '-' (it names the stage's "
                             "directory under output_dir)")
        return name


class PipelineConfig(Section):
    """`rlhf run`: stages in order, each reading earlier stages' artifacts."""

    name: str = Field("pipeline", description="pipeline name; the W&B group")
    output_dir: str = Field("runs/pipeline", description="each stage writes to <output_dir>/<stage name>")
    seed: int | None = Field(None, description="if set, every stage's seed")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="W&B settings for every stage")
    stages: list[StageSpec] = Field(min_length=1, description="the stages, in order (at least one)")


def load_pipeline(path: str | Path, overrides: list[str]) -> tuple[PipelineConfig, dict[str, dict]]:
    """Pipeline config plus per-stage overrides: `sft.train.max_steps=10` goes to stage `sft`, `seed=1` to the
    pipeline."""
    data = read_yaml(path)
    stages = data.get("stages")
    stage_names = {s.get("name") for s in stages if isinstance(s, dict)} if isinstance(stages, list) else set()
    pipeline_overrides, stage_overrides = {}, {}
    for key, value in parse_overrides(overrides).items():
        head, _, rest = key.partition(".")
        if head in stage_names and rest:
            stage_overrides.setdefault(head, {})[rest] = value
        else:
            pipeline_overrides[key] = value
    for key, value in pipeline_overrides.items():
        set_dotted(data, key, value)
    cfg = validate(PipelineConfig, data, source=str(path))
    seen: list[str] = []
    for spec in cfg.stages:
        recipe(spec.kind)
        if spec.name.lower() in (s.lower() for s in seen):  # one directory each, also on case-insensitive disks
            raise UserError(f"{path}: stage name '{spec.name}' is used twice (names must be unique, ignoring case)")
        for key, source in spec.inputs.items():
            if _source_stage(source) not in seen:
                raise UserError(f"{path}: stage '{spec.name}' takes '{key}' from '{source}', which is not an earlier stage")
            inner = source.partition("/")[2]
            if inner and (Path(inner).is_absolute() or ".." in Path(inner).parts):
                raise UserError(f"{path}: stage '{spec.name}' takes '{key}' from '{source}': the path after the stage "
                                "name must stay inside that stage's directory")
        seen.append(spec.name)
    return cfg, stage_overrides


def _source_stage(source: str) -> str:
    """'collect/preferences' -> 'collect': an input names a stage, optionally a path inside its directory."""
    return source.partition("/")[0]


def stage_config(pipeline: PipelineConfig, spec: StageSpec, cli_overrides: dict, outputs: dict[str, str]) -> StageConfig:
    """The resolved config of one pipeline stage: its YAML, its overrides, the command line's, then the wiring."""
    overrides = {**spec.overrides, **cli_overrides}
    for key, source in spec.inputs.items():
        stage, _, inner = source.partition("/")
        overrides[key] = str(Path(outputs[stage]) / inner) if inner else outputs[stage]
    overrides["output_dir"] = str(Path(pipeline.output_dir) / spec.name)
    if pipeline.seed is not None:
        overrides["seed"] = pipeline.seed
    tracking = pipeline.tracking.model_copy(update={"group": pipeline.tracking.group or pipeline.name})
    overrides["tracking"] = tracking.model_dump()
    return load_config(recipe(spec.kind).Config, spec.config, overrides)


def run_pipeline(path: str | Path, overrides: list[str], *, from_stage: str | None = None,
                 only: str | None = None, overwrite: bool = False, debug: bool = False) -> dict[str, dict]:
    """Run a pipeline's stages in order, then print a summary of each stage's headline metrics. Returns each stage's
    result.

    Every stage's config is resolved and validated before the first stage runs. A stage whose config changed replaces
    its own earlier artifact; a directory holding another stage's or another kind's artifact needs `overwrite`.
    """
    pipeline, stage_overrides = load_pipeline(path, overrides)
    stage_dir.check_output_dir(pipeline.output_dir)
    names = [s.name for s in pipeline.stages]
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in names:
            hint = nearest_key(value, names)
            raise UserError(f"{flag} {value}: no such stage" + (f" (did you mean '{hint}'?)" if hint else f"; stages: {', '.join(names)}"))
    outputs: dict[str, str] = {}
    configs: dict[str, StageConfig] = {}
    for spec in pipeline.stages:  # validate every stage's config before any stage runs
        try:
            configs[spec.name] = stage_config(pipeline, spec, stage_overrides.get(spec.name, {}), outputs)
        except UserError as exc:
            raise UserError(f"stage '{spec.name}': {exc}") from None
        outputs[spec.name] = configs[spec.name].output_dir
    fingerprints: dict[str, str] = {}
    results: dict[str, dict] = {}
    rerun_rest = False
    reached_from = from_stage is None
    for spec in pipeline.stages:
        cfg = configs[spec.name]
        inputs = {key: fingerprints[_source_stage(src)] for key, src in spec.inputs.items()}
        reached_from = reached_from or spec.name == from_stage
        if only is not None and spec.name != only:
            manifest = stage_dir.read_manifest(cfg.output_dir) or {}
            if manifest.get("status") != "complete":
                # a stage that --only skips must already be there for the stages that read it
                fingerprints[spec.name] = "missing"
            else:
                fingerprints[spec.name] = manifest["fingerprint"]
            continue
        if only is not None:
            missing = [_source_stage(src) for src in spec.inputs.values() if fingerprints[_source_stage(src)] == "missing"]
            if missing:
                raise UserError(f"--only {only}: its input stage '{missing[0]}' has not completed; run it first")
        force = (reached_from and from_stage is not None) or rerun_rest
        result = run_stage(spec.kind, cfg, name=spec.name, input_fingerprints=inputs, overwrite=overwrite, force=force,
                           rerun=True, debug=debug)
        fingerprints[spec.name] = result["fingerprint"]
        results[spec.name] = result
        rerun_rest = rerun_rest or result["status"] == "ran"
    if _is_main_process():
        print(format_summary(pipeline, results))
    return results


# the numbers a stage is judged by, in this order (a reward model's accuracy next to its noise ceiling)
HEADLINE_METRICS = (
    "loss/total", "eval/loss", "eval/gold_score", "eval/sampled/gold_score", "eval/accuracy", "eval/noise_ceiling",
    "train/reward", "train/kl",
)


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The headline subset of a stage's final metrics; for the eval stage each model's mean gold scores
    (`eval/<model>/gold_score`, not the per-task breakdown)."""
    out = {key: metrics[key] for key in HEADLINE_METRICS if key in metrics}
    for key, value in metrics.items():
        head, _, rest = key.partition("/")
        label, _, name = rest.partition("/")
        if head == "eval" and label and name in ("gold_score", "sampled/gold_score") and key not in out:
            out[key] = value
    return out


def format_summary(pipeline: PipelineConfig, results: dict[str, dict]) -> str:
    """One line per stage: name, kind, ran / skipped / not selected, headline metrics."""
    width = max(len(spec.name) for spec in pipeline.stages)
    lines = [f"pipeline '{pipeline.name}' summary ({pipeline.output_dir}):"]
    for spec in pipeline.stages:
        result = results.get(spec.name)
        status = result["status"] if result else "not selected"
        numbers = "  ".join(f"{k} {v:.4g}" for k, v in headline_metrics(result["metrics"] if result else {}).items())
        lines.append(f"  {spec.name.ljust(width)}  {spec.kind:<8} {status:<12} {numbers}".rstrip())
    return "\n".join(lines)
