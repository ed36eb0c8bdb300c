"""Rule-based rewards: functions of (prompts, completions, metadata) that return one float per completion.

Every rule has the signature

    rule(prompts: list[str], completions: list[str], metadata: list[dict], **params) -> list[float]

where `metadata[i]` is the prompt record of row i (e.g. `{"task": "add", "meta": {"answer": 85, ...}}`), plus
`"ended"` (bool: the completion stopped with EOS) when the caller knows it. Built-in rules are named in configs by
their name (`rule: verifiable`); your own by import path (`rule: mypackage.rewards:brevity`), with the same
signature. Penalties are ≤ 0 and bonuses ≥ 0, so a component's `weight` is always a positive strength.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
import traceback
from typing import Callable, Sequence

from rlhf.errors import UserError

Rule = Callable[..., list[float]]


def verifiable(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict],
               tasks: Sequence[str] | None = None) -> list[float]:
    """The demo world's gold scorers (`rlhf.world.gold_score`: exact answer for "add", the rubric for "review").

    `tasks` limits it to some tasks (e.g. `["add"]`, the verifiable one); rows of other tasks score 0.
    """
    from rlhf.world import TASKS, gold_score

    out = []
    for prompt, completion, meta in zip(prompts, completions, metadata):
        task = meta.get("task")
        if task is None:
            raise UserError("rule 'verifiable' needs a 'task' field in each prompt record")
        if tasks is not None and task not in tasks:
            out.append(0.0)
            continue
        if task not in TASKS:
            raise UserError(f"rule 'verifiable': a prompt record has task {_short(task)}, which has no gold scorer "
                            f"(known tasks: {', '.join(TASKS)}); keep only those with data.tasks, or limit the rule "
                            "with params.tasks")
        out.append(gold_score(task, prompt, completion, meta.get("meta")))
    return out


def exact_match(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict],
                field: str = "answer", pattern: str | None = None) -> list[float]:
    """1.0 when the answer equals the reference, else 0.0.

    The reference is `metadata[i][field]` (or `metadata[i]["meta"][field]`); the answer is the last match of
    `pattern`'s first group (e.g. `"answer\\s*(-?\\d+)"`), or the whole stripped completion when `pattern` is null.
    """
    regex = re.compile(pattern) if pattern else None
    out = []
    for completion, meta in zip(completions, metadata):
        reference = meta.get(field, (meta.get("meta") or {}).get(field))
        if reference is None:
            raise UserError(f"rule 'exact_match' needs a '{field}' field in each prompt record (or its 'meta')")
        if regex is None:
            answer = completion.strip()
        else:
            found = regex.findall(completion)
            answer = (found[-1] if isinstance(found[-1], str) else found[-1][0]).strip() if found else None
        out.append(1.0 if answer is not None and answer == str(reference).strip() else 0.0)
    return out


def format_match(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict],
                 pattern: str = r"<answer>.*?</answer>", full: bool = False) -> list[float]:
    """1.0 when the completion has the required format: `pattern` found anywhere (or matching the whole stripped
    completion with `full`), else 0.0. E.g. the demo's worked-reasoning format: `"\\d\\+\\d.*answer \\d+"`."""
    regex = re.compile(pattern, re.DOTALL)
    match = regex.fullmatch if full else regex.search
    return [1.0 if match(c.strip() if full else c) else 0.0 for c in completions]


def length_penalty(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict],
                   max_words: int = 40) -> list[float]:
    """−(words over the budget) / budget: 0 within `max_words`, −1 at twice the budget (whitespace words)."""
    return [-max(0, len(c.split()) - max_words) / max_words for c in completions]


def repetition_penalty(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict],
                       n: int = 3) -> list[float]:
    """−(fraction of word n-grams that repeat an earlier one): 0 for no repeats, towards −1 for a loop."""
    out = []
    for c in completions:
        words = c.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        out.append(-(1 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out


def missing_eos(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]) -> list[float]:
    """−1.0 for a completion cut off at the token budget instead of ending with EOS (needs `metadata[i]["ended"]`,
    which the scorer fills in from the rollout)."""
    if any("ended" not in m for m in metadata):
        raise UserError("rule 'missing_eos' needs to know whether each completion ended: score a rollout "
                        "(Scorer.score_rollout) or pass ended=...")
    return [0.0 if m["ended"] else -1.0 for m in metadata]


BUILTIN_RULES: dict[str, Rule] = {
    "verifiable": verifiable,
    "exact_match": exact_match,
    "format": format_match,
    "length_penalty": length_penalty,
    "repetition_penalty": repetition_penalty,
    "missing_eos": missing_eos,
}


def _regex(params: dict, key: str, default: str | None) -> str | None:
    """Why `params[key]` cannot be compiled as a regular expression (None: it can, or it is null and may be)."""
    pattern = params.get(key, default)
    if pattern is None and default is None:
        return None
    if not isinstance(pattern, str):
        return f"params.{key} must be a regular expression string, got {_short(pattern)}"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"params.{key} {_short(pattern)} is not a valid regular expression ({exc})"
    return None


def _positive_int(params: dict, key: str) -> str | None:
    value = params.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"params.{key} must be a whole number ≥ 1, got {_short(value)}"
    return None


def _known_tasks(params: dict) -> str | None:
    from rlhf.world import TASKS

    tasks = params.get("tasks")
    if tasks is None:
        return None
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        return f"params.tasks must be a list of task names, got {_short(tasks)}"
    unknown = [t for t in tasks if t not in TASKS]
    return f"params.tasks names unknown task(s) {', '.join(map(_short, unknown))} (known: {', '.join(TASKS)})" if unknown else None


# the value checks of the built-in rules' params: each returns why they are wrong, or None
_PARAM_CHECKS: dict[str, Callable[[dict], str | None]] = {
    "verifiable": _known_tasks,
    "exact_match": lambda p: _regex(p, "pattern", None),
    "format": lambda p: _regex(p, "pattern", r"<answer>.*?</answer>"),
    "length_penalty": lambda p: _positive_int(p, "max_words"),
    "repetition_penalty": lambda p: _positive_int(p, "n"),
}


def check_params(name: str, spec: str, fn: Rule, params: dict) -> None:
    """Refuse `params` the rule cannot take, before anything is scored: names its signature lacks and, for the
    built-in rules, bad values (an invalid regex, a zero budget, an unknown task)."""
    try:
        inspect.signature(fn).bind([], [], [], **params)
    except TypeError as exc:
        raise UserError(f"reward '{name}': bad params for rule '{spec}' ({exc})") from None
    except ValueError:  # no signature to read (a C function): the call will tell
        pass
    problem = _PARAM_CHECKS[spec](params) if fn is BUILTIN_RULES.get(spec) and spec in _PARAM_CHECKS else None
    if problem:
        raise UserError(f"reward '{name}': rule '{spec}': {problem}")


def _short(value, limit: int = 60) -> str:
    """A value's repr, cut for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame of `exc`'s traceback outside the import machinery."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def resolve_rule(spec: str) -> Rule:
    """A built-in rule by name, or a user function by import path `package.module:function`."""
    if ":" not in spec:
        if spec in BUILTIN_RULES:
            return BUILTIN_RULES[spec]
        close = difflib.get_close_matches(spec, list(BUILTIN_RULES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown rule '{spec}'{hint}; built-in rules: {', '.join(BUILTIN_RULES)}; "
                        "or give a function as package.module:function")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"rule '{spec}': cannot import module '{module_name}' ({exc})") from None
    except SyntaxError as exc:
        raise UserError(f"rule '{spec}': {exc.filename}:{exc.lineno}: syntax error in module '{module_name}' "
                        f"({exc.msg})") from None
    except Exception as exc:  # the module's own code failed while importing: say where
        raise UserError(f"rule '{spec}': importing module '{module_name}' failed at {_where(exc)} "
                        f"({type(exc).__name__}: {_one_line(exc)})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"rule '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


def apply_rule(name: str, fn: Rule, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict],
               params: dict) -> list[float]:
    """Call a rule and check its answer: one finite number per completion. An exception inside the rule becomes
    one line naming the reward and where it was raised (`--debug` shows the traceback)."""
    spec = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
    try:
        inspect.signature(fn).bind(prompts, completions, metadata, **params)
    except TypeError as exc:
        raise UserError(f"reward '{name}': bad params for its rule {spec} ({exc})") from None
    except ValueError:  # no signature to read
        pass
    try:
        values = fn(list(prompts), list(completions), list(metadata), **params)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"reward '{name}': its rule {spec} raised {type(exc).__name__}: {_one_line(exc)} "
                        f"(at {_where(exc)})") from exc
    try:
        values = list(values)
    except TypeError:  # None, a single number...
        raise UserError(f"reward '{name}': its rule {spec} must return a list of one number per completion, got "
                        f"{type(values).__name__} {_short(values)}") from None
    if len(values) != len(completions):
        raise UserError(f"reward '{name}': rule returned {len(values)} scores for {len(completions)} completions")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"reward '{name}': rule must return numbers, got {_short(values[:3])}") from None
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"reward '{name}': rule returned a non-finite score ({values[bad[0]]}) at row {bad[0]}")
    return values
