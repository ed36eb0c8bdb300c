"""A stage's output directory: ownership checks, the manifest, and the context a recipe runs in.

The manifest is written `running` when a stage starts and `complete` (with final metrics) only after every
artifact is on disk, via an atomic rename: a killed stage never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf import __version__
from rlhf.errors import UserError

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
TMP_PREFIX = ".tmp"  # what a killed write leaves (ours, and safetensors' `.tmpXXXXXX`): never part of an artifact


@dataclass
class StageContext:
    """What a recipe gets besides its config."""

    name: str
    kind: str
    dir: Path
    tracker: Any  # rlhf.tracking.Tracker
    resume: bool = False  # a previous attempt with the same config left checkpoints to continue from
    debug: bool = False
    extra: dict = field(default_factory=dict)


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # not JSON, or not even UTF-8 text
        return {"tool": "?"}


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write `path` (text, bytes, or `data(tmp_path)` writing it) under a temporary name beside it, then rename: a
    kill or a full disk leaves the old file or the new one, never half of one, and no temporary."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}-{os.getpid()}-{path.name}")  # created as open() does: the umask's mode
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_into(directory: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp_dir)` into a temporary directory inside `directory`, then each file it wrote renamed into place: a
    kill leaves whole files only (and the temporary directory, removed later), a failure removes the temporary."""
    directory = Path(directory)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=f"{TMP_PREFIX}-save-"))
    try:
        write(staging)
        for src in sorted(staging.rglob("*")):
            if src.is_file():
                dest = directory / src.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Atomic: a reader sees the old manifest or the new one, never half of one."""
    atomic_write(Path(directory) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def remove_temporaries(directory: str | Path) -> None:
    """Delete what killed writes left in a stage directory and its subdirectories (checkpoints/, critic/...)."""
    directory = Path(directory)
    for path in [*directory.glob(f"{TMP_PREFIX}*"), *directory.glob(f"*/{TMP_PREFIX}*")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def input_paths(config: Any, prefix: str = "") -> list[tuple[str, Path]]:
    """(dotted key, path) of every string in a config (a dumped dict) that names an existing file or directory:
    the stage's inputs (model.path, data.train, reward models...), whatever the recipe calls them."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return [(prefix, Path(config))] if isinstance(config, str) and config and os.path.exists(config) else []
    return [found for key, value in items for found in input_paths(value, f"{prefix}.{key}" if prefix else str(key))]


def claim(
    directory: str | Path, *, stage: str, kind: str, fingerprint: str, overwrite: bool = False, fresh: bool = False,
    rerun: bool = False, inputs: list[tuple[str, Path]] = (),
) -> str:
    """Decide what to do with `directory` for a stage whose config hashes to `fingerprint`.

    Returns "complete" (same config already finished: skip), "resume" (same config interrupted: continue from its
    checkpoints) or "fresh". A directory that holds files rlhf did not write is never touched; one that holds
    another config's artifact is replaced only with `overwrite`; `fresh` starts over even when the config matches.
    `rerun` (a pipeline's changed stage) and `fresh` replace only the same stage's own artifact (same stage name and
    kind): another kind's or another stage's artifact, complete or not, is deleted only with `overwrite`. A directory
    that is or holds one of the stage's `inputs` ((key, path) pairs) is never deleted: the stage would lose its input.
    """
    directory = Path(directory)
    try:
        return _claim(directory, stage=stage, kind=kind, fingerprint=fingerprint, overwrite=overwrite, fresh=fresh,
                      rerun=rerun, inputs=inputs)
    except OSError as exc:  # not writable, an over-long name, a file in the way...
        reason = exc.strerror or str(exc)
        raise UserError(f"output_dir {directory}: cannot use it as the stage's directory ({reason})") from None


def check_output_dir(directory: str | Path) -> None:
    """Refuse an output directory that cannot hold a stage, naming why: it is a file, lies under a file, its parent
    is not writable, or its name is too long."""
    directory = Path(directory)
    for part in directory.parts:
        if len(os.fsencode(part)) > 255:
            raise UserError(f"output_dir {str(directory)[:80]}...: a path component is longer than 255 bytes")
    try:
        existing = next(p for p in (directory, *directory.parents) if p.exists())
    except OSError as exc:
        raise UserError(f"output_dir {directory}: {exc.strerror or exc}") from None
    if not existing.is_dir():
        where = "is a file" if existing == directory else f"lies under the file {existing}"
        raise UserError(f"output_dir {directory} {where}, not a directory; choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {directory}: {existing} is not writable; choose another output_dir")


def _claim(directory: Path, *, stage: str, kind: str, fingerprint: str, overwrite: bool, fresh: bool, rerun: bool,
           inputs: list[tuple[str, Path]]) -> str:
    check_output_dir(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if directory.exists() and any(directory.iterdir()):
            raise UserError(
                f"output directory {directory} holds files that rlhf did not write (no {MANIFEST}); "
                "choose another output_dir or empty it"
            )
    elif manifest.get("tool") != "rlhf":
        raise UserError(f"output directory {directory} holds another tool's artifact ({MANIFEST} is not ours)")
    elif manifest.get("fingerprint") == fingerprint and manifest.get("kind") == kind and not fresh:
        if manifest.get("status") == "complete":
            return "complete"
        return "resume"
    # from here on the directory is replaced: first make sure that deletes none of the stage's inputs
    _refuse_deleting_inputs(directory, inputs)
    if manifest is not None and not overwrite:
        state = "a complete" if manifest.get("status") == "complete" else "an incomplete"
        own = manifest.get("kind") == kind and manifest.get("stage") == stage
        if not own:
            raise UserError(
                f"output directory {directory} holds {state} '{manifest.get('kind')}' artifact of stage "
                f"'{manifest.get('stage')}', not this '{kind}' stage's; pass --overwrite to replace it or choose "
                "another output_dir"
            )
        if not (rerun or fresh):
            raise UserError(
                f"output directory {directory} holds {state} '{manifest.get('kind')}' artifact made with a different "
                "config; pass --overwrite to replace it or choose another output_dir"
            )
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    write_manifest(directory, _manifest(stage, kind, fingerprint, "running"))
    return "fresh"


def _refuse_deleting_inputs(directory: Path, inputs: list[tuple[str, Path]]) -> None:
    if not directory.exists():
        return
    root = directory.resolve()
    for key, path in inputs:
        resolved = path.resolve()
        if resolved == root or root in resolved.parents:
            where = "is" if resolved == root else "holds"
            raise UserError(f"output_dir {directory} {where} this stage's input {key}={path}: replacing the directory "
                            "would delete it before the stage reads it; choose another output_dir")


def _manifest(stage: str, kind: str, fingerprint: str, status: str, **extra) -> dict:
    return {
        "tool": "rlhf",
        "version": __version__,
        "stage": stage,
        "kind": kind,
        "fingerprint": fingerprint,
        "status": status,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def finish(directory: str | Path, *, stage: str, kind: str, fingerprint: str, status: str, **extra) -> None:
    """Mark the stage `complete` (or `failed`), recording inputs, final metrics and timings."""
    write_manifest(directory, _manifest(stage, kind, fingerprint, status, **extra))
