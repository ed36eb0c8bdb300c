"""Generate the demo world's data files and tokenizer.

    python -m rlhf.world.generate_data --out data/demo [--seed 0] [--small]
    python -m rlhf.world.generate_data --vision --out DIR [--seed 0] [--small]   # rlhf.world.vision's images

Deterministic: the same seed and sizes write the same bytes. Files (see data/README.md for the full description):

    pretrain.jsonl       {"text"}                                  web-like text, no action tokens
    sft.jsonl            {"prompt", "completion", "task", "meta"}  demonstrations of mixed quality
    sft_messages.jsonl   {"messages", "task", "meta"}              the same kind of rows in chat form
    rl_prompts.jsonl     {"prompt", "task", "meta"}                RL prompts, disjoint from eval
    eval_prompts.jsonl   {"prompt", "task", "meta"}                held-out evaluation prompts
    tokenizer/           the trained tokenizer (save_pretrained)

Held-out design: the addition eval prompts use operand pairs (in either order) that appear nowhere else — not in
pretraining, SFT or RL; the review eval prompts use (color, product) combinations that appear in no SFT or RL
prompt (products and colors themselves are shared: the world has only 16 products).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.world import arithmetic, reviews
from rlhf.world.tasks import ACTION_TOKENS
from rlhf.world.tokenizer import train_tokenizer


@dataclass(frozen=True)
class Sizes:
    """Row counts of each file, and the tokenizer's vocabulary size."""

    pretrain_review_docs: int = 8000
    pretrain_arith_docs: int = 4000
    sft_per_task: int = 3000
    sft_messages_per_task: int = 150
    rl_per_task: int = 1000
    eval_add: int = 100
    eval_review: int = 96  # 6 held-out colors for each of the 16 products
    add_digits: int = 2  # operands are drawn from 0 .. 10**add_digits - 1
    add_mistake_rate: float = 0.12  # share of addition demonstrations with a human slip
    vocab_size: int = 768  # the world's corpus saturates at ~700 merges: every word of the grammar is one token


# For tests: the same files in miniature (a second or so).
SMALL = Sizes(pretrain_review_docs=200, pretrain_arith_docs=100, sft_per_task=100, sft_messages_per_task=10,
              rl_per_task=50, eval_add=20, eval_review=16, vocab_size=400)

FILES = ("pretrain.jsonl", "sft.jsonl", "sft_messages.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl")


# ------------------------------------------------------------------------------------------------- addition


def _split_pairs(rng: random.Random, sizes: Sizes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(eval pairs, train pairs). An eval pair is held out in both orders, so a+b and b+a are both unseen."""
    n = 10**sizes.add_digits
    unordered = sorted({(min(a, b), max(a, b)) for a in range(n) for b in range(n)})
    rng.shuffle(unordered)
    held = set(unordered[: sizes.eval_add])
    eval_pairs = [p if rng.random() < 0.5 else (p[1], p[0]) for p in unordered[: sizes.eval_add]]
    train_pairs = [(a, b) for a in range(n) for b in range(n) if (min(a, b), max(a, b)) not in held]
    return eval_pairs, train_pairs


def _add_row(a: int, b: int, fmt: str, sizes: Sizes) -> dict:
    d = sizes.add_digits
    return {"prompt": arithmetic.prompt(a, b, fmt, d), "task": "add", "meta": arithmetic.meta(a, b, fmt, d)}


def _add_demo(rng: random.Random, a: int, b: int, sizes: Sizes) -> dict:
    fmt = rng.choice(arithmetic.FORMATS)
    mistake = rng.choice(arithmetic.MISTAKES) if rng.random() < sizes.add_mistake_rate else None
    return {**_add_row(a, b, fmt, sizes),
            "completion": arithmetic.completion(a, b, fmt, mistake, sizes.add_digits)}


def _arith_doc(rng: random.Random, train_pairs: list[tuple[int, int]], sizes: Sizes) -> str:
    """A few correct facts, one per line, in either format (the question text without the action token)."""
    lines = []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.choice(train_pairs)
        fmt = rng.choice(arithmetic.FORMATS)
        d = sizes.add_digits
        lines.append(arithmetic.question(a, b, fmt, d) + arithmetic.completion(a, b, fmt, digits=d))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- reviews


def _split_combos(rng: random.Random, sizes: Sizes) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(eval, train) (product, color) combinations; eval takes the same number of colors from every product."""
    per_product, extra = divmod(sizes.eval_review, len(reviews.PRODUCTS))
    eval_combos, train_combos = [], []
    for i, product in enumerate(reviews.PRODUCTS):
        colors = list(reviews.COLORS)
        rng.shuffle(colors)
        k = per_product + (1 if i < extra else 0)
        eval_combos += [(product, c) for c in colors[:k]]
        train_combos += [(product, c) for c in colors[k:]]
    return eval_combos, train_combos


def _review_row(product: str, color: str) -> dict:
    return {"prompt": reviews.prompt(product, color), "task": "review", "meta": reviews.meta(product, color)}


def _review_doc(rng: random.Random) -> str:
    """Web-style review text, sloppier than demonstrations, under one of three headings (or none).

    The "product: navy kettle" heading is the prompt's own wording: seeing it in pretraining is what lets a
    ~1M model ground a review in the prompt's product after a few hundred SFT steps.
    """
    product, color = rng.choice(reviews.PRODUCTS), rng.choice(reviews.COLORS)
    body = reviews.write_review(rng, product, reviews.WEB)
    r = rng.random()
    if r < 0.35:
        return f"product: {color} {product}{body}"
    if r < 0.65:
        return f"{color} {product} review:{body}"
    return body[1:]


# -------------------------------------------------------------------------------------------------- writing


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _strip_action(text: str) -> str:
    for token in ACTION_TOKENS:
        text = text.replace(token, "")
    return text


def _as_messages(row: dict) -> dict:
    """A prompt/completion row in chat form; the assistant content drops the completion's leading space
    (the chat template puts it back)."""
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"][1:]},
        ],
        "task": row["task"],
        "meta": row["meta"],
    }


def generate(out: str | Path, seed: int = 0, sizes: Sizes = Sizes()) -> dict[str, int]:
    """Write every file under ``out`` (created if needed); returns the row count of each jsonl file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # One RNG per artifact, so resizing one file leaves the others' contents unchanged.
    rngs = {name: random.Random(f"{seed}/{name}") for name in ("split", "pretrain", "sft", "rl", "messages")}

    eval_pairs, train_pairs = _split_pairs(rngs["split"], sizes)
    eval_combos, train_combos = _split_combos(rngs["split"], sizes)

    r = rngs["pretrain"]
    pretrain = [{"text": _review_doc(r)} for _ in range(sizes.pretrain_review_docs)]
    pretrain += [{"text": _arith_doc(r, train_pairs, sizes)} for _ in range(sizes.pretrain_arith_docs)]
    r.shuffle(pretrain)

    r = rngs["sft"]
    sft = [_add_demo(r, *r.choice(train_pairs), sizes) for _ in range(sizes.sft_per_task)]
    for _ in range(sizes.sft_per_task):
        product, color = r.choice(train_combos)
        sft.append({**_review_row(product, color),
                    "completion": reviews.write_review(r, product, reviews.DEMO)})
    r.shuffle(sft)
    # Fixed key order in the file: prompt, completion, task, meta.
    sft = [{"prompt": x["prompt"], "completion": x["completion"], "task": x["task"], "meta": x["meta"]} for x in sft]

    r = rngs["messages"]
    messages = [_as_messages(_add_demo(r, *r.choice(train_pairs), sizes)) for _ in range(sizes.sft_messages_per_task)]
    for _ in range(sizes.sft_messages_per_task):
        product, color = r.choice(train_combos)
        row = {**_review_row(product, color), "completion": reviews.write_review(r, product, reviews.DEMO)}
        messages.append(_as_messages(row))
    r.shuffle(messages)

    r = rngs["rl"]
    # Distinct operand pairs for addition RL prompts; review prompts repeat (there are only ~160 train combos).
    rl = [_add_row(a, b, r.choice(arithmetic.FORMATS), sizes) for a, b in r.sample(train_pairs, sizes.rl_per_task)]
    rl += [_review_row(*r.choice(train_combos)) for _ in range(sizes.rl_per_task)]
    r.shuffle(rl)

    # Eval: addition alternates formats so each is half the set; reviews in a fixed product order.
    evals = [_add_row(a, b, arithmetic.FORMATS[i % 2], sizes) for i, (a, b) in enumerate(eval_pairs)]
    evals += [_review_row(p, c) for p, c in eval_combos]

    for name, rows in zip(FILES, (pretrain, sft, messages, rl, evals)):
        _write_jsonl(out / name, rows)

    # Tokenizer corpus: everything the models will read, minus the action tokens (the SFT stage adds those),
    # plus the chat headers so the template's markers get merged into few tokens.
    corpus = [row["text"] for row in pretrain]
    corpus += [_strip_action(row["prompt"]) + row["completion"] for row in sft]
    corpus += [f"<|user|> {_strip_action(m['messages'][0]['content'])}\n<|assistant|> {m['messages'][1]['content']}"
               for m in messages]
    tokenizer = train_tokenizer(corpus, vocab_size=sizes.vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return {name: len(rows) for name, rows in zip(FILES, (pretrain, sft, messages, rl, evals))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--small", action="store_true", help="miniature sizes, for tests")
    parser.add_argument("--chat", action="store_true",
                        help="write the chat tasks' files for a real chat model instead (rlhf.world.chat)")
    parser.add_argument("--vision", action="store_true",
                        help="render the vision world's images and files instead (rlhf.world.vision; --small applies)")
    args = parser.parse_args(argv)
    if args.chat and args.vision:
        parser.error("--chat and --vision write different worlds: give one of them")
    if args.vision:
        from rlhf.world import vision

        for name, n in vision.generate(args.out, seed=args.seed, small=args.small).items():
            print(f"{name}: {n} rows")
        return
    if args.chat:
        from rlhf.world import chat

        for name, n in chat.generate(args.out, seed=args.seed).items():
            print(f"{name}: {n} rows")
        return
    sizes = SMALL if args.small else Sizes()
    counts = generate(args.out, seed=args.seed, sizes=sizes)
    for name, n in counts.items():
        print(f"{name}: {n} rows")
    print(f"sizes: {asdict(sizes)}")


if __name__ == "__main__":
    main()
