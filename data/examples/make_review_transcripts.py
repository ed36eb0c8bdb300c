"""Write `review_transcripts.jsonl`: the demo world's example review pairs as conversation transcripts in TRL's
implicit-prompt format, the form several published preference sets take:

    {"chosen": "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant: <chosen review>",
     "rejected": "<the same conversation>\n\nAssistant: <rejected review>"}

Each pair of `data/demo/preferences_example.jsonl` (ties left out: the format has no tie field) becomes a chat of
one or two earlier exchanges about the product and a final request for a review, answered by the two reviews. Only
`chosen` and `rejected` are written, no `prompt`: the reward stage splits the shared conversation off itself.
Deterministic: the same input and seed write the same bytes.

    python data/examples/make_review_transcripts.py        # from the repository root
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlhf.world.reviews import PARTS, PLACES, TIMES

ROOT = Path(__file__).resolve().parents[2]
EARLIER = (  # (human, assistant) exchanges before the request
    ("I just got a {color} {product} for my {place}.",
     "Nice! A {color} {product} sounds like a good fit for your {place}. How has it been so far?"),
    ("What should I look at when I judge a {product}?",
     "Look at the {p0} and the {p1} first, then at the {p2} and the {p3}: those are the parts that wear out or break "
     "first, and they decide whether a {product} is worth buying again."),
    ("My last {product} broke after a {time}. Is that normal?",
     "Not really. A well-made {product} should last much longer than a {time}; if the {p0} or the {p1} fails that "
     "fast, it is usually a problem of build quality rather than bad luck, and a review should say so."),
    ("Can you help me write reviews of things I bought?",
     "Of course. Tell me what you bought and I will write a short review of it."),
)
REQUESTS = (
    "Please write a short review of my {color} {product}.",
    "Now write a review of the {color} {product}.",
    "Write a review of it, please: it is the {color} {product}.",
)


def transcript(row: dict, rng: random.Random) -> dict:
    """One implicit-prompt row: the shared conversation, then each review as the last assistant turn."""
    product, color = row["meta"]["product"], row["meta"]["color"]
    p0, p1, p2, p3 = rng.sample(PARTS[product], 4)
    words = {"product": product, "color": color, "p0": p0, "p1": p1, "p2": p2, "p3": p3,
             "place": rng.choice(PLACES), "time": rng.choice(TIMES)}
    chat = ""
    for human, assistant in rng.sample(EARLIER, rng.choice((1, 2))):
        chat += f"\n\nHuman: {human.format(**words)}\n\nAssistant: {assistant.format(**words)}"
    chat += f"\n\nHuman: {rng.choice(REQUESTS).format(**words)}\n\nAssistant:"
    return {"chosen": chat + row["chosen"], "rejected": chat + row["rejected"]}  # reviews start with a space


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=str(ROOT / "data/demo/preferences_example.jsonl"))
    parser.add_argument("--out", default=str(ROOT / "data/examples/review_transcripts.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    out = [transcript(r, rng) for r in rows if not r.get("tie")]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"wrote {len(out)} transcript pairs to {args.out}")


if __name__ == "__main__":
    main()
