"""The verifiable task of the demo world: adding two small numbers.

Surface forms (the prompt picks the completion format), shown for ``digits=2``:

    direct:  prompt "<add> 47+38="         completion " 085"
    reason:  prompt "<add> 47+38= steps:"  completion " 7+8=15, 4+3+1=08, answer 085"

Everything is fixed-width: operands are zero-padded to ``digits`` digits ("07"), column sums to two digits, answers
to ``digits + 1`` digits, and every column after the first shows its carry-in (``+0`` or ``+1``). Fixed widths put
each digit a model must copy at a constant distance from where it is needed, which is what lets a ~1M-parameter
model learn addition in a few hundred steps (with variable widths it had not after 600).

The worked ("reason") format writes one step per digit column, least significant first. Its answer is the last
column's two-digit sum followed by the ones digits of the earlier columns in reverse, so it can be copied from the
steps rather than computed.

Completions start with a space and prompts end without one (the convention of every task), so a byte-level BPE
tokenizes ``prompt + completion`` exactly as the two halves tokenized apart.
"""

from __future__ import annotations

import re

ACTION = "<add>"
FORMATS = ("direct", "reason")
MISTAKES = ("carry", "digit")
_REASON_CUE = " steps:"

# Bounded digit runs: Python refuses int() on strings over 4300 digits, and garbage may hold such runs.
_MAX_DIGITS = 30
_INT = re.compile(r"\d+")
_ANSWER = re.compile(r"answer\s*(\d+)")
_PROMPT = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=(\s*steps:)?")


def _check(a: int, b: int, fmt: str, digits: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown addition format {fmt!r}; expected one of {FORMATS}")
    if not (0 <= a < 10**digits and 0 <= b < 10**digits):
        raise ValueError(f"operands {a}, {b} do not fit in {digits} digits")


def question(a: int, b: int, fmt: str, digits: int = 2) -> str:
    """The question text without the action token, e.g. ``"47+08= steps:"``.

    Pretraining documents use it bare; prompts prefix it with ``"<add> "``.
    """
    _check(a, b, fmt, digits)
    return f"{a:0{digits}d}+{b:0{digits}d}=" + (_REASON_CUE if fmt == "reason" else "")


def prompt(a: int, b: int, fmt: str, digits: int = 2) -> str:
    """The policy's prompt: action token, then the question. Ends without a trailing space."""
    return f"{ACTION} {question(a, b, fmt, digits)}"


def meta(a: int, b: int, fmt: str, digits: int = 2) -> dict:
    """The row metadata the gold scorer reads: operands, their sum, the requested format and the operand width."""
    return {"a": a, "b": b, "answer": a + b, "format": fmt, "digits": digits}


def steps(a: int, b: int, digits: int = 2, drop_carry: bool = False) -> list[str]:
    """The worked steps of ``a + b``, one per digit column, least significant first.

    Example: ``steps(47, 38) == ["7+8=15", "4+3+1=08"]``. ``drop_carry=True`` writes the classic slip of
    forgetting every carry (``["7+8=15", "4+3+0=07"]``).
    """
    da, db = f"{a:0{digits}d}"[::-1], f"{b:0{digits}d}"[::-1]
    out, carry = [], 0
    for i, (x, y) in enumerate(zip(da, db)):
        total = int(x) + int(y) + carry
        out.append(f"{x}+{y}={total:02d}" if i == 0 else f"{x}+{y}+{carry}={total:02d}")
        carry = 0 if drop_carry else total // 10
    return out


def answer_from_steps(column_steps: list[str]) -> str:
    """The answer the steps spell: the last column's two-digit sum, then the earlier columns' ones digits reversed."""
    sums = [s.rsplit("=", 1)[1] for s in column_steps]
    return sums[-1] + "".join(s[-1] for s in reversed(sums[:-1]))


def completion(a: int, b: int, fmt: str, mistake: str | None = None, digits: int = 2) -> str:
    """A demonstration completion (leading space, no EOS), correct unless ``mistake`` names a human slip.

    mistakes: ``"carry"`` — every carry forgotten (in the reason format the steps show it and the answer follows
    the wrong steps); ``"digit"`` — the final answer's last digit off by one (a careless copy).
    A ``"carry"`` mistake on a sum without carries is no mistake: the completion is then correct.
    """
    _check(a, b, fmt, digits)
    if mistake is not None and mistake not in MISTAKES:
        raise ValueError(f"unknown mistake {mistake!r}; expected None or one of {MISTAKES}")
    column_steps = steps(a, b, digits, drop_carry=mistake == "carry")
    final = answer_from_steps(column_steps)
    if mistake == "digit":
        last = int(final[-1])
        final = final[:-1] + str(last + 1 if last != 9 else last - 1)
    if fmt == "direct":
        return f" {final}"
    return " " + ", ".join(column_steps) + f", answer {final}"


def parse_prompt(text: str) -> dict:
    """Recover ``meta`` from a prompt such as ``"<add> 47+38= steps:"``; raises ValueError when it is not one."""
    m = _PROMPT.search(text)
    if m is None:
        raise ValueError(f"not an addition prompt: {text!r}")
    digits = max(len(m.group(1)), len(m.group(2)))
    return meta(int(m.group(1)), int(m.group(2)), "reason" if m.group(3) else "direct", digits)


def extract_answer(completion_text: str, fmt: str) -> int | None:
    """The number the completion commits to, or None.

    direct: the first integer in the text. reason: the integer after the last ``answer`` (intermediate step
    results do not count). Leading zeros are allowed ("085" is 85). A digit run too long to be any sum reads as
    -1. Never raises on any string.
    """
    if fmt == "reason":
        found = _ANSWER.findall(completion_text)
        digits = found[-1] if found else None
    else:
        m = _INT.search(completion_text)
        digits = m.group(0) if m else None
    if digits is None:
        return None
    # A run longer than any sum is a wrong answer, not a parse error: -1 never equals a sum.
    return int(digits) if len(digits) <= _MAX_DIGITS else -1


def gold_score(prompt_text: str, completion_text: str, row_meta: dict | None) -> float:
    """1.0 when the committed answer equals ``a + b``, else 0.0.

    ``row_meta`` needs ``a``, ``b`` and ``format``; when it is missing or lacks them they are parsed from the prompt.
    """
    m = row_meta if row_meta and "a" in row_meta and "format" in row_meta else parse_prompt(prompt_text)
    got = extract_answer(completion_text, m["format"])
    return 1.0 if got is not None and got == int(m["a"]) + int(m["b"]) else 0.0
