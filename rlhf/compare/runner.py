"""Plan and run a comparison: every algorithm × seed (× sweep value) as an ordinary stage run on one budget.

The budget rule. A run's `train.max_steps` comes from the budget and the run's own config, never from a step count:

    samples per step  = rl.prompts_per_step × sampling.n × processes           (PPO, GRPO, RLOO, REINFORCE++...)
                      = train.batch_size × train.grad_accum × processes       (DPO and other offline-pair stages:
                                                                               one "sample" = one preference pair)
    budget.samples N  → max_steps = N / samples per step   (N must be a multiple, so every run gets exactly N)
    budget.tokens T   → max_steps = T // (samples per step × sampling.max_new_tokens)   (a cap: no run can exceed T;
                                                                               the report shows the tokens each used)

Evaluation runs every `eval.every_samples` (rounded to whole steps; default 8 times a run) on the held-out prompts,
so every algorithm's `eval/gold_score` and `eval/rm_score` land on the same `progress/samples` grid.

Each run goes through `rlhf.pipeline.run_stage` into `<output_dir>/<algorithm>[/<key>-<value>]/seed-<s>`: complete runs
with an unchanged config are skipped, interrupted ones resume from their checkpoint, and one failed run is recorded
and reported while the others go on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf import stage as stage_dir
from rlhf.compare.config import (
    BASE_EVAL_FILE, BEST_OF_N_FILE, COMPLETIONS_FILE, PLAN_FILE, CompareConfig, load_compare,
)
from rlhf.compare.report import write_report
from rlhf.config import StageConfig, load_config, nearest_key, valid_keys
from rlhf.errors import UserError


@dataclass
class PlannedRun:
    """One (algorithm, sweep value, seed) of a comparison and its resolved stage config."""

    algorithm: str
    arm: str  # the algorithm, or "<algorithm> <key>=<value>" within a sweep: what the report aggregates over seeds
    variant: dict[str, Any]
    seed: int
    kind: str
    name: str  # stage name and W&B run name suffix: "<arm slug>-seed<s>"
    dir: str
    samples_per_step: int
    max_steps: int
    eval_every: int
    budget_unit: str
    budget: int
    beta: float | None = None
    kl_target: float | None = None
    cfg: StageConfig | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("cfg")
        return out


# ---------------------------------------------------------------------------------------------------------------
# Planning: one resolved, validated stage config per run, before anything runs


def algorithm_recipe(algorithm: str, kind: str):
    """The recipe module of an algorithm's stage kind; an unregistered or unimportable kind is an error naming the
    algorithm (a comparison may list PPO or DPO before their stages land)."""
    from rlhf.pipeline import STAGES, recipe

    if kind not in STAGES:
        hint = nearest_key(kind, list(STAGES))
        raise UserError(f"algorithm '{algorithm}': stage kind '{kind}' is not registered in rlhf.pipeline.STAGES"
                        + (f" (did you mean '{hint}'?)" if hint else f"; known: {', '.join(STAGES)}"))
    try:
        return recipe(kind)
    except ModuleNotFoundError as exc:
        raise UserError(f"algorithm '{algorithm}': stage kind '{kind}' is registered but its recipe {STAGES[kind]} "
                        f"cannot be imported ({exc})") from None


def samples_per_step(kind: str, cfg: StageConfig, processes: int = 1) -> int:
    """Generated samples one step consumes (see the module docstring for the rule)."""
    rl, sampling, train = getattr(cfg, "rl", None), getattr(cfg, "sampling", None), getattr(cfg, "train", None)
    if rl is not None and sampling is not None and hasattr(rl, "prompts_per_step"):
        return rl.prompts_per_step * sampling.n * processes
    if train is not None and hasattr(train, "batch_size"):  # offline preference pairs (DPO)
        return train.batch_size * getattr(train, "grad_accum", 1) * processes
    raise UserError(f"stage kind '{kind}': cannot tell its samples per step (no rl.prompts_per_step × sampling.n and no "
                    "train.batch_size)")


def budget_steps(cfg: CompareConfig, stage_cfg: StageConfig, sps: int) -> int:
    """`train.max_steps` that spends the comparison's budget (see the module docstring)."""
    budget = cfg.budget
    if budget.samples is not None:
        if budget.samples % sps:
            lo, hi = budget.samples // sps * sps, (budget.samples // sps + 1) * sps
            raise UserError(f"budget.samples={budget.samples} is not a multiple of its {sps} samples per step, so budgets "
                            f"would differ; use {lo or hi}" + (f" or {hi}" if lo else "")
                            + " (or change its rl.prompts_per_step / sampling.n)")
        return budget.samples // sps
    sampling = getattr(stage_cfg, "sampling", None)
    if sampling is None or not hasattr(sampling, "max_new_tokens"):
        raise UserError("budget.tokens needs sampling.max_new_tokens, which this stage kind has not; use budget.samples")
    steps = budget.tokens // (sps * sampling.max_new_tokens)
    if steps < 1:
        raise UserError(f"budget.tokens={budget.tokens} is less than one step ({sps} samples × {sampling.max_new_tokens} "
                        "tokens)")
    return steps


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _variants(spec) -> list[dict[str, Any]]:
    if not spec.sweep:
        return [{}]
    ((key, values),) = spec.sweep.items()
    return [{key: v} for v in values]


def plan(cfg: CompareConfig, processes: int | None = None) -> list[PlannedRun]:
    """Every run of the comparison with its resolved stage config, seed-major (all algorithms of the first seed
    first, so a comparison stopped early already compares). Raises `UserError` for any config problem."""
    if processes is None:
        from rlhf.distributed import process_state

        processes = process_state().num_processes
    schemas = {name: algorithm_recipe(name, spec.kind).Config for name, spec in cfg.algorithms.items()}
    keys = {name: set(valid_keys(schema)) for name, schema in schemas.items()}
    for key in cfg.shared:
        if not any(_accepts(k, key) for k in keys.values()):
            everything = sorted(set().union(*keys.values()))
            hint = nearest_key(key, everything)
            raise UserError(f"shared key '{key}' is not a config key of any algorithm" + (f" (did you mean '{hint}'?)" if hint else ""))
    runs: list[PlannedRun] = []
    for seed in cfg.seeds:
        for name, spec in cfg.algorithms.items():
            for variant in _variants(spec):
                runs.append(_plan_one(cfg, name, spec, schemas[name], keys[name], variant, seed, processes))
    return runs


def _accepts(keys: set[str], key: str) -> bool:
    """Whether a schema takes dotted `key`: one of its keys, or a key inside a dict-valued field (a field with no
    sub-keys of its own, e.g. `tracking.run_config.x`)."""
    if key in keys:
        return True
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in keys:
            return not any(k.startswith(head + ".") for k in keys)
    return False


def _plan_one(cfg: CompareConfig, name: str, spec, schema, keys: set[str], variant: dict, seed: int,
              processes: int) -> PlannedRun:
    where = f"algorithm '{name}'"
    for key in [*spec.overrides, *variant]:
        if not _accepts(keys, key):
            hint = nearest_key(key, sorted(keys))
            raise UserError(f"{where}: '{key}' is not a config key of stage kind '{spec.kind}'"
                            + (f" (did you mean '{hint}'?)" if hint else ""))
    if "model.path" not in keys:
        raise UserError(f"{where}: stage kind '{spec.kind}' has no model.path to start from `base`")
    arm, slug, sub = name, name, Path(name)
    if variant:
        ((key, value),) = variant.items()
        leaf = key.rsplit(".", 1)[-1]
        arm, slug, sub = f"{name} {leaf}={_fmt(value)}", f"{name}-{leaf}{_fmt(value)}", sub / f"{leaf}-{_fmt(value)}"
    run_dir = Path(cfg.output_dir) / sub / f"seed-{seed}"
    overrides: dict[str, Any] = {k: v for k, v in cfg.shared.items() if _accepts(keys, k)}
    overrides.update(spec.overrides)
    overrides.update(variant)
    overrides.update({"model.path": cfg.base, "seed": seed, "output_dir": str(run_dir)})
    try:
        first = load_config(schema, spec.config, overrides)
        sps = samples_per_step(spec.kind, first, processes)
        steps = budget_steps(cfg, first, sps)
        every = cfg.eval.every_samples or cfg.budget.amount / 8
        eval_every = max(1, min(steps, round(steps * every / cfg.budget.amount)))
        overrides.update({"train.max_steps": steps, "train.eval_every": eval_every})
        if "samples_every" in keys:  # completion tables at the eval cadence
            overrides["samples_every"] = eval_every
        if "train.save_every" in keys and not first.train.save_every:  # a killed comparison must be able to resume
            overrides["train.save_every"] = eval_every
        beta, target = _beta(first)
        run_name = f"{slug}-seed{seed}"
        overrides["tracking"] = cfg.tracking.model_copy(update={
            "group": cfg.tracking.group or cfg.name, "run_name": f"{cfg.name}/{run_name}", "job_type": name,
            "run_config": {"comparison": cfg.name, "algorithm": name, "arm": arm, "seed": seed, "beta": beta,
                           "kl_target": target, "sweep": variant, "budget": {cfg.budget.unit: cfg.budget.amount},
                           "samples_per_step": sps},
        }).model_dump(mode="json")
        resolved = load_config(schema, spec.config, overrides)
    except UserError as exc:
        raise UserError(f"{where}{f' ({arm})' if variant else ''}: {exc}") from None
    if getattr(getattr(resolved, "loss", None), "dynamic_sampling", False):
        print(f"[compare] note: {arm} uses dynamic sampling: it generates more samples than the budget counts "
              "(the budget counts trained samples)")
    return PlannedRun(algorithm=name, arm=arm, variant=variant, seed=seed, kind=spec.kind, name=run_name,
                      dir=str(run_dir), samples_per_step=sps, max_steps=steps, eval_every=eval_every,
                      budget_unit=cfg.budget.unit, budget=cfg.budget.amount, beta=beta, kl_target=target, cfg=resolved)


def _beta(stage_cfg) -> tuple[float | None, float | None]:
    """(β, KL target) of a run: `kl.beta` / `kl.target` of the RL stages, DPO's `loss.beta` (no target)."""
    kl = getattr(stage_cfg, "kl", None)
    if kl is not None and hasattr(kl, "beta"):
        return kl.beta, getattr(kl, "target", None)
    loss = getattr(stage_cfg, "loss", None)
    return getattr(loss, "beta", getattr(stage_cfg, "beta", None)), None


def fairness_differences(runs: list[PlannedRun]) -> dict[str, dict[str, str]]:
    """Settings that should be equal across algorithms but are not: {key: {arm: value}}. Compared only where every
    run's config has the key (the starting checkpoint, prompts, rewards, held-out prompts and their scorer)."""
    keys = ("model.path", "data.prompts", "data.tasks", "rewards", "eval.prompts", "eval.tasks", "eval.rewards",
            "eval.generation.max_new_tokens", "sampling.max_new_tokens", "kl.target")
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        values: dict[str, str] = {}
        for run in runs:
            node: Any = run.cfg.model_dump(mode="json") if run.cfg is not None else {}
            for part in key.split("."):
                node = node.get(part, "<absent>") if isinstance(node, dict) else "<absent>"
            values.setdefault(run.arm, json.dumps(node, sort_keys=True))
        if "<absent>" not in "".join(values.values()) and len(set(values.values())) > 1:
            out[key] = values
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running


def run_comparison(path: str, overrides: list[str] | None = None, *, report_only: bool = False, overwrite: bool = False,
                   fail_fast: bool = False, debug: bool = False) -> dict[str, Any]:
    """Plan, (prepare,) run every run that is not complete, then write the report. Returns
    {"runs": {name: status}, "report": path, "failed": [names], "table": markdown summary}."""
    cfg = load_compare(path, overrides)
    stage_dir.check_output_dir(cfg.output_dir)
    runs = plan(cfg)
    out = Path(cfg.output_dir)
    if report_only and not (out / PLAN_FILE).is_file() and not any(stage_dir.read_manifest(r.dir) for r in runs):
        raise UserError(f"--report-only: nothing to report in {out}: no run of this comparison has started there "
                        "(run it without --report-only first)")
    if not report_only and cfg.prepare is None:
        check_inputs(cfg, runs)
    main = _is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    previous = _read_plan(out)
    outcomes: dict[str, dict] = {r.name: previous.get(r.name, {}) for r in runs}
    _write_plan(cfg, runs, outcomes)
    for key, values in fairness_differences(runs).items():
        print(f"[compare] warning: '{key}' differs between algorithms: {values}")
    if not report_only:
        if cfg.prepare is not None:
            _prepare(cfg, debug=debug)
            check_inputs(cfg, runs)
        isolate = cfg.isolate and _num_processes() == 1  # under `accelerate launch` every process runs each stage
        started = time.monotonic()
        for i, run in enumerate(runs, 1):
            print(f"[compare] {i}/{len(runs)}: {run.arm}, seed {run.seed}: {run.max_steps} steps × {run.samples_per_step} "
                  f"samples -> {run.dir}", flush=True)
            t0 = time.monotonic()
            try:
                if isolate:
                    outcome = _run_in_subprocess(path, overrides or [], run, overwrite=overwrite, debug=debug)
                else:
                    outcome = _run_here(run, overwrite=overwrite, debug=debug or fail_fast)
            except KeyboardInterrupt:
                outcomes[run.name] = {"status": "interrupted", "error": "interrupted: rerun the same command to resume"}
                _write_plan(cfg, runs, outcomes)
                raise
            outcome["attempt_seconds"] = round(time.monotonic() - t0, 2)
            outcomes[run.name] = outcome
            _write_plan(cfg, runs, outcomes)
            if outcome["status"] != "complete":  # one failed run is reported, and the others still run
                print(f"[compare] {run.name} FAILED: {outcome['error']}", flush=True)
                if fail_fast:
                    raise UserError(f"run {run.name} failed: {outcome['error']}")
        print(f"[compare] runs done in {time.monotonic() - started:.0f}s")
    if not main:
        return {"runs": {}, "report": None, "failed": [], "table": ""}
    for extra in (base_evaluation, best_of_n_baseline, side_by_side_completions):
        try:
            extra(cfg, runs)
        except Exception as exc:  # the report is still worth writing without them
            print(f"[compare] warning: {extra.__name__} skipped ({type(exc).__name__}: {exc})")
    report = write_report(out)
    statuses = {r["name"]: r["status"] for r in report["runs"]}
    failed = [name for name, status in statuses.items() if status != "complete"]
    from rlhf.compare.dashboard import publish

    publish(cfg, runs)
    return {"runs": statuses, "report": report["html"], "failed": failed, "table": report["text"]}


# config keys whose value is an input a run reads (a model directory or a data file)
INPUT_KEYS = ("model.path", "model.ref_path", "model.tokenizer", "data.prompts", "data.train", "data.eval", "eval.prompts")


def check_inputs(cfg: CompareConfig, runs: list[PlannedRun]) -> None:
    """Before any run starts: `base` must be a model directory, and an input missing for every run (shared prompts,
    a reward model) is an error, since each run would fail on it in turn. An input only some runs lack is reported
    now, and those runs fail while the others go on."""
    from rlhf.data import FILE_SUFFIXES
    from rlhf.policy import check_model_dir

    def missing(value: str) -> bool:  # a local path that is not there (a hub id is not checked)
        looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1 or Path(value).suffix in FILE_SUFFIXES
        return looks_local and not Path(value).expanduser().exists()

    if missing(cfg.base):
        raise UserError(f"config key 'base': model path not found: {cfg.base}"
                        + ("" if cfg.prepare else " (train it first, or set `prepare` to make it)"))
    try:
        check_model_dir(cfg.base)
    except UserError as exc:
        raise UserError(f"config key 'base': {exc}") from None
    problems: dict[str, str] = {}
    for run in runs:
        dumped = run.cfg.model_dump(mode="json") if run.cfg is not None else {}
        values = [(key, _dotted_get(dumped, key)) for key in INPUT_KEYS]
        for section in ("rewards", "eval.rewards"):
            values += [(f"{section}.{i}.model", c.get("model")) for i, c in enumerate(_dotted_get(dumped, section) or [])]
        bad = next(((k, v) for k, v in values if isinstance(v, str) and missing(v)), None)
        if bad is not None:
            problems[run.name] = f"config key '{bad[0]}': not found: {bad[1]}"
    if runs and len(problems) == len(runs):
        raise UserError(f"every run would fail, starting with {runs[0].name}: {problems[runs[0].name]}")
    for name, problem in problems.items():
        print(f"[compare] warning: {name} will fail: {problem}", flush=True)


def _dotted_get(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _run_here(run: PlannedRun, *, overwrite: bool, debug: bool) -> dict[str, Any]:
    """Run one stage in this process. Returns its outcome: {"status": complete | failed, "action", "error"}."""
    from rlhf.pipeline import run_stage

    try:
        result = run_stage(run.kind, run.cfg, name=run.name, overwrite=overwrite, debug=debug)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if debug:
            raise
        if not isinstance(exc, UserError):
            traceback.print_exc()
        return {"status": "failed", "action": None, "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "complete", "action": result["status"], "error": None}


def _run_in_subprocess(path: str, overrides: list[str], run: PlannedRun, *, overwrite: bool, debug: bool) -> dict[str, Any]:
    """Run one stage in a fresh Python process (`python -m rlhf.compare CONFIG --run NAME`): its peak memory is
    its own (ru_maxrss only grows within a process), and a crash stays in its run."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "outcome.json"
        cmd = [sys.executable, "-m", "rlhf.compare", path, "--run", run.name, "--outcome", str(result_file)]
        cmd += (["--overwrite"] if overwrite else []) + (["--debug"] if debug else [])
        cmd += [f"--override={item}" for item in overrides]
        code = subprocess.run(cmd).returncode
        if code in (130, -signal.SIGINT):
            raise KeyboardInterrupt
        if result_file.is_file():
            return json.loads(result_file.read_text())
    return {"status": "failed", "action": None, "error": f"its process exited with code {code} (see the log above)"}


def run_one_main(argv: list[str]) -> int:
    """Entry point of one isolated run: re-plan the comparison (same config and overrides), run the named run."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(prog="python -m rlhf.compare")
    parser.add_argument("config")
    parser.add_argument("--run", required=True)
    parser.add_argument("--outcome", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--override", action="append", default=[], help="key=value, as given to `rlhf compare`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    outcome_path = Path(args.outcome)
    try:
        runs = {r.name: r for r in plan(load_compare(args.config, args.override), processes=1)}
        if args.run not in runs:
            raise UserError(f"no run named {args.run} in {args.config}")
        outcome = _run_here(runs[args.run], overwrite=args.overwrite, debug=args.debug)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        outcome = {"status": "failed", "action": None, "error": f"UserError: {exc}"}
    outcome_path.write_text(json.dumps(outcome))
    return 0 if outcome["status"] == "complete" else 1


def _is_main_process() -> bool:
    from rlhf.distributed import process_state

    return process_state().is_main_process


def _num_processes() -> int:
    from rlhf.distributed import process_state

    return process_state().num_processes


def _prepare(cfg: CompareConfig, debug: bool) -> None:
    """Run (or skip, when complete) the pipeline stages that make the base checkpoint, one `--only` at a time."""
    from rlhf.pipeline import run_pipeline

    for name in cfg.prepare.stages:
        run_pipeline(cfg.prepare.pipeline, [], only=name, debug=debug)


def _read_plan(out: Path) -> dict[str, dict]:
    path = out / PLAN_FILE
    if not path.is_file():
        return {}
    try:
        return {r["name"]: r.get("outcome", {}) for r in json.loads(path.read_text())["runs"]}
    except (ValueError, KeyError, TypeError):
        return {}


def _write_plan(cfg: CompareConfig, runs: list[PlannedRun], outcomes: dict[str, dict]) -> None:
    if not _is_main_process():
        return
    payload = {
        "name": cfg.name, "base": cfg.base, "seeds": cfg.seeds, "budget": {cfg.budget.unit: cfg.budget.amount},
        "project": cfg.tracking.project, "group": cfg.tracking.group or cfg.name,
        "shared": cfg.shared, "algorithms": {k: v.model_dump(mode="json") for k, v in cfg.algorithms.items()},
        "fairness_differences": fairness_differences(runs),
        "runs": [{**r.record(), "outcome": outcomes.get(r.name, {})} for r in runs],
    }
    path = Path(cfg.output_dir) / PLAN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# The base checkpoint's held-out scores: where every run starts (0 samples), evaluated as the recipes evaluate


def _reference(runs: list[PlannedRun]) -> PlannedRun | None:
    """The first run whose config has held-out prompts: its eval settings and scorers stand for all (they are shared)."""
    return next((r for r in runs if r.cfg is not None and getattr(getattr(r.cfg, "eval", None), "prompts", None)), None)


def base_evaluation(cfg: CompareConfig, runs: list[PlannedRun]) -> Path | None:
    """Write `<output_dir>/base_eval.json`: the base checkpoint's `eval/gold_score` and `eval/rm_score` with the
    runs' own eval settings (cached while the base and those settings are unchanged)."""
    ref = _reference(runs)
    if ref is None:
        return None
    out = Path(cfg.output_dir) / BASE_EVAL_FILE
    key = {"base": cfg.base, "base_fingerprint": _dir_fingerprint(cfg.base),
           "eval": ref.cfg.eval.model_dump(mode="json"), "rewards": [c.model_dump(mode="json") for c in ref.cfg.rewards],
           "seed": ref.seed}
    if out.is_file() and json.loads(out.read_text()).get("key") == key:
        return out
    from rlhf.config import ModelSettings
    from rlhf.data import load_rl_prompts, prompt_budget
    from rlhf.evaluation import evaluate_gold, scorer_score_fn
    from rlhf.policy import PolicyModel

    policy = PolicyModel.load(ModelSettings(path=cfg.base))
    ev = ref.cfg.eval
    budget = prompt_budget(policy.model.config, ev.generation.max_new_tokens, "eval.generation.max_new_tokens")
    records = load_rl_prompts(ev.prompts, ev.tasks, ev.limit, policy.tokenizer, max_prompt_tokens=budget,
                              image_inputs=policy.image_inputs, model_name=cfg.base)
    gold, train = _scorers(ref.cfg)
    metrics = evaluate_gold(policy, records, ev.generation, scorer_score_fn(gold or train, train), seed=ref.seed)
    out.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1))
    return out


def best_of_n_baseline(cfg: CompareConfig, runs: list[PlannedRun]) -> Path | None:
    """Write `<output_dir>/best_of_n.json`: best-of-n of the base checkpoint on the runs' held-out prompts, for n
    = 1, 2, 4 ... `best_of_n.max_n`, scored by the gold scorer, picked by the training reward (cached while the base
    and the settings are unchanged)."""
    ref = _reference(runs)
    if cfg.best_of_n is None or ref is None:
        return None
    if not getattr(ref.cfg.eval, "rewards", None):
        print("[compare] best-of-n baseline skipped: it needs a gold scorer (eval.rewards) besides the training reward")
        return None
    out = Path(cfg.output_dir) / BEST_OF_N_FILE
    ev, bon = ref.cfg.eval, cfg.best_of_n
    key = {"base": cfg.base, "base_fingerprint": _dir_fingerprint(cfg.base), "best_of_n": bon.model_dump(),
           "eval": ev.model_dump(mode="json"), "rewards": [c.model_dump(mode="json") for c in ref.cfg.rewards],
           "seed": ref.seed}
    if out.is_file() and json.loads(out.read_text()).get("key") == key:
        return out
    from rlhf.compare.best_of_n import best_of_n_curve
    from rlhf.config import ModelSettings
    from rlhf.data import load_rl_prompts, prompt_budget
    from rlhf.policy import PolicyModel

    policy = PolicyModel.load(ModelSettings(path=cfg.base))
    budget = prompt_budget(policy.model.config, ev.generation.max_new_tokens, "eval.generation.max_new_tokens")
    records = load_rl_prompts(ev.prompts, ev.tasks, bon.prompts, policy.tokenizer, max_prompt_tokens=budget,
                              image_inputs=policy.image_inputs, model_name=cfg.base)
    gold, train = _scorers(ref.cfg)
    n = bon.max_n
    print(f"[compare] best-of-n baseline: {n} samples of {cfg.base} on each of {len(records)} held-out prompts")
    rollout = policy.generate([r["prompt"] for r in records], n=n, max_new_tokens=ev.generation.max_new_tokens,
                              temperature=ev.generation.temperature, seed=ref.seed)
    reward = train.score_rollout(rollout, records).total.view(len(records), n).tolist()
    golds = gold.score_rollout(rollout, records).total.view(len(records), n).tolist()
    ns = [2 ** k for k in range(n.bit_length()) if 2 ** k <= n]
    curve = best_of_n_curve(reward, golds, ns)
    stage_dir.atomic_write(out, json.dumps({"key": key, "prompts": len(records), "samples": n, "curve": curve}, indent=1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Side-by-side completions: each algorithm's final policy (its first complete seed) and the base, greedy, on the
# same held-out prompts, scored by the gold scorer and by the training reward


def side_by_side_completions(cfg: CompareConfig, runs: list[PlannedRun]) -> Path | None:
    """Write `<output_dir>/completions.json` (cached per run fingerprint). Returns its path, or None when nothing
    to show."""
    if cfg.eval.completions == 0:
        return None
    out = Path(cfg.output_dir) / COMPLETIONS_FILE
    cached = json.loads(out.read_text()) if out.is_file() else {}
    reference = _reference(runs)
    if reference is None:
        return None
    chosen: dict[str, PlannedRun] = {}
    for run in runs:
        manifest = stage_dir.read_manifest(run.dir) or {}
        if manifest.get("status") == "complete" and run.arm not in chosen:
            chosen[run.arm] = run
    if not chosen:
        return None
    from rlhf.data import load_task_prompts

    ev = reference.cfg.eval
    records = load_task_prompts(ev.prompts, ev.tasks, ev.limit)
    records = records[:: max(1, len(records) // cfg.eval.completions)][: cfg.eval.completions]  # spread over the set
    if not records:
        return None
    prompts = [r["prompt"] for r in records]
    gold, train = _scorers(reference.cfg)
    max_new = ev.generation.max_new_tokens
    columns = []
    old = {(c["arm"], c.get("fingerprint")): c for c in cached.get("columns", []) if cached.get("prompts") == prompts}
    for label, model_dir, fingerprint in [("base (SFT)", cfg.base, _dir_fingerprint(cfg.base))] + [
            (arm, run.dir, (stage_dir.read_manifest(run.dir) or {}).get("fingerprint")) for arm, run in chosen.items()]:
        if (label, fingerprint) in old:
            columns.append(old[(label, fingerprint)])
            continue
        rows = _generate_and_score(model_dir, records, max_new, gold, train)
        seed = None if label == "base (SFT)" else chosen[label].seed
        columns.append({"arm": label, "dir": str(model_dir), "seed": seed, "fingerprint": fingerprint, "rows": rows})
    payload = {"prompts": prompts, "gold": [c.name for c in gold.components] if gold else [],
               "reward": [c.name for c in train.components], "columns": columns}
    out.write_text(json.dumps(payload, indent=1))
    return out


def _dir_fingerprint(path: str) -> str | None:
    manifest = stage_dir.read_manifest(path) or {}
    return manifest.get("fingerprint") or (str(Path(path, "model.safetensors").stat().st_mtime)
                                           if Path(path, "model.safetensors").exists() else None)


def _scorers(stage_cfg):
    """(the gold scorer of `eval.rewards`, or None when the runs evaluate with their training reward; that reward)."""
    from reward_models.scoring import Scorer

    train = Scorer(stage_cfg.rewards)
    rewards = getattr(stage_cfg.eval, "rewards", None)
    return (Scorer(rewards) if rewards else None), train


def _generate_and_score(model_dir: str, records: list[dict], max_new_tokens: int, gold, train) -> list[dict]:
    """One model's greedy completion of each record, with its gold score (`gold`, else the training reward) and its
    training-reward score."""
    from rlhf.config import GenerationSettings, ModelSettings
    from rlhf.data import prompt_text
    from rlhf.evaluation import score_prompts, scorer_score_fn
    from rlhf.generation import default_backend
    from rlhf.policy import PolicyModel

    policy = PolicyModel.load(ModelSettings(path=str(model_dir)))
    rows = [{**r, "prompt": prompt_text(r, policy.tokenizer)} for r in records]  # each model with its own tokenizer
    score, completions = scorer_score_fn(gold or train, train), []

    def score_and_keep(prompts, texts, batch, ended):  # the table shows the completions beside their scores
        completions.extend(texts)
        return score(prompts, texts, batch, ended)

    # all prompts in one generate call on `PolicyModel.generate`'s default sampler: a cached column of an unchanged
    # model (see the caller) and a fresh one are then decoded alike
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=len(rows), backend=default_backend())
    scores = score_prompts(policy, rows, settings, score_and_keep)
    rm = scores.extras.get("rm_score", scores.greedy)
    return [{"completion": c, "gold": round(g, 4), "rm": round(r, 4), "ended": e}
            for c, g, r, e in zip(completions, scores.greedy, rm, scores.ended)]
