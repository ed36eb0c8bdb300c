"""Two chat tasks for a real pretrained chat model, with hidden gold scorers that read free English text.

- ``"chat_add"``: "What is 47 + 38? Reply with just the number." Verifiable: gold 1.0 when the last integer of the
  answer is the sum, else 0.0.
- ``"chat_review"``: "Write a short review of a red kettle." Open-ended: a hidden rubric in [-1, 1] that the reward
  model learns only from simulated annotators' Bradley-Terry-noisy preferences (`SimulatedAnnotator`).

Prompts are chat messages (rendered by each model's own chat template). `rlhf world --chat --out data/chat` writes
the SFT demonstrations, RL prompts and held-out evaluation prompts.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from rlhf.world.reviews import COLORS, PARTS, PRODUCTS

TASKS = ("chat_add", "chat_review")
ADD_QUESTION = "What is {a} + {b}? Reply with just the number."
REVIEW_REQUEST = "Write a short review of a {color} {product}."

POSITIVE = frozenset("great excellent love lovely sturdy reliable comfortable solid perfect happy recommend nice "
                     "good well easy beautiful quiet fast".split())
NEGATIVE = frozenset("bad poor broke broken cheap flimsy terrible awful disappointed hate noisy slow weak "
                     "useless".split())
WORD = re.compile(r"[a-z']+")
REVIEW_WORDS = (25, 60)  # a "short review": full length credit inside, none past twice the upper end


def add_answer_score(completion: str, answer: int) -> float:
    """1.0 when the last integer in the text is `answer` (thousands separators allowed), else 0.0: the conclusion
    counts, so "47 + 38 = 85" is right and "47 + 38 = 114" is not."""
    numbers = re.findall(r"-?\d[\d,]*", completion)
    return float(bool(numbers) and numbers[-1].rstrip(",").replace(",", "") == str(answer))


def review_score(product: str, completion: str) -> float:
    """The hidden rubric of a review, in [-1, 1]: it names the product (0.3), talks about its parts (0.2 for two),
    has a short-review length (0.3), leans positive (0.2) and ends its last sentence (else -0.2); empty is -1."""
    words = WORD.findall(completion.lower())
    if not words:
        return -1.0
    noun = (product.split() or [""])[-1]
    score = 0.3 * bool(noun) * (noun in words or noun + "s" in words)
    score += 0.1 * min(2, len({p for p in PARTS.get(noun, ()) if p in words}))
    low, high = REVIEW_WORDS
    n = len(words)
    length = 1.0 if low <= n <= high else n / low if n < low else max(0.0, 1 - (n - high) / high)
    score += 0.3 * length
    positive, negative = sum(w in POSITIVE for w in words), sum(w in NEGATIVE for w in words)
    score += 0.2 * (positive - negative) / max(1, positive + negative)
    if not completion.rstrip().endswith((".", "!", "?")):
        score -= 0.2
    return max(-1.0, min(1.0, score))


def gold_score(task: str, prompt: str, completion: str, meta: dict) -> float:
    """The hidden gold score; what `meta` lacks is read from the prompt text (a rendered chat prompt works too).
    Never raises on a completion; a prompt of neither form scores 0 (add) or as a review of nothing."""
    if task == "chat_add":
        answer = meta.get("answer")
        if answer is None:
            match = re.search(r"What is (\d+) \+ (\d+)\?", prompt)
            if match is None:
                return 0.0
            answer = int(match.group(1)) + int(match.group(2))
        return add_answer_score(completion, int(answer))
    if task == "chat_review":
        product = meta.get("product")
        if product is None:
            match = re.search(r"review of an? (.+?)\.", prompt)
            product = match.group(1) if match else ""
        return review_score(product, completion)
    raise ValueError(f"unknown chat task {task!r}; expected one of {TASKS}")


# ---------------------------------------------------------------------------------------------------------------
# Data


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def add_row(a: int, b: int) -> dict:
    return {"prompt": _user(ADD_QUESTION.format(a=a, b=b)), "task": "chat_add", "meta": {"a": a, "b": b, "answer": a + b}}


def review_row(product: str, color: str) -> dict:
    return {"prompt": _user(REVIEW_REQUEST.format(color=color, product=product)), "task": "chat_review",
            "meta": {"product": product, "color": color}}


OPENINGS = ("I bought this {color} {product} a month ago and I am very happy with it.",
            "This {color} {product} is a great buy.", "I love my new {color} {product}.")
PART_LINES = ("The {part} is sturdy and well made.", "The {part} feels solid and works perfectly.",
              "I like the {part}, it is easy to use.")
CLOSINGS = ("It is reliable and I would recommend it to anyone.", "Overall a nice {product} that works well every day.",
            "I would happily buy it again.")


def demo_review(rng: random.Random, product: str, color: str) -> str:
    """A demonstration: a good review by the rubric, in plain English (about 30-40 words)."""
    first, second = rng.sample(PARTS[product], 2)
    lines = [rng.choice(OPENINGS), rng.choice(PART_LINES).format(part=first),
             rng.choice(PART_LINES).format(part=second), rng.choice(CLOSINGS)]
    return " ".join(line.format(color=color, product=product) for line in lines)


def generate(out: str | Path, seed: int = 0, sft_per_task: int = 200, rl_per_task: int = 200,
             eval_per_task: int = 100) -> dict[str, int]:
    """Write sft.jsonl (messages), rl_prompts.jsonl and eval_prompts.jsonl under `out`; operand pairs and
    product/colour combinations of the evaluation set are never in training."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    combos = [(p, c) for p in PRODUCTS for c in COLORS]
    rng.shuffle(combos)
    eval_pairs, train_pairs = pairs[:eval_per_task], pairs[eval_per_task:]
    eval_combos, train_combos = combos[:eval_per_task], combos[eval_per_task:]

    sft = []
    for a, b in rng.sample(train_pairs, sft_per_task):
        row = add_row(a, b)
        sft.append({"messages": row["prompt"] + [{"role": "assistant", "content": str(a + b)}], "task": row["task"],
                    "meta": row["meta"]})
    for product, color in (rng.choice(train_combos) for _ in range(sft_per_task)):
        row = review_row(product, color)
        sft.append({"messages": row["prompt"] + [{"role": "assistant", "content": demo_review(rng, product, color)}],
                    "task": row["task"], "meta": row["meta"]})
    rng.shuffle(sft)
    rl = [add_row(a, b) for a, b in rng.sample(train_pairs, rl_per_task)]
    rl += [review_row(*rng.choice(train_combos)) for _ in range(rl_per_task)]
    rng.shuffle(rl)
    evals = [add_row(a, b) for a, b in eval_pairs] + [review_row(p, c) for p, c in eval_combos]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"sft.jsonl": sft, "rl_prompts.jsonl": rl, "eval_prompts.jsonl": evals}
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {name: len(rows) for name, rows in files.items()}

