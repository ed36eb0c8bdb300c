"""The open-ended task of the demo world: short product reviews in a tiny grammar, and their gold judge.

Prompt ``"<review> product: red kettle"``; completion ``" the kettle is great . i love the lid ."`` — lower case,
words and the sentence-ending ``"."`` separated by single spaces, a leading space (the convention of every task).

The grammar (N is the product noun or one of its parts; ``is``/``are`` must agree with N):

    the N is|are [very] ADJ .        i VERB the N .         it works ADV .
    i would [not] buy it again .     the N broke after a day|week|month .
    i bought this PRODUCT for my PLACE .

Gold score, in [-1, 1] (see :func:`gold_score`): sentiment of the well-formed on-topic sentences, mentioning the
product and its parts, and a moderate length of 2-4 sentences raise it; sentences outside the grammar, repeated
sentences and sentences about another product lower it; empty text is -1. Every term is a visible surface feature
so a small reward model can learn it from pairwise preferences, and the maximum (1.0, e.g. three distinct
sentences at full positive polarity naming the product and two parts) sits well above the demonstrations' mean.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ACTION = "<review>"

PARTS: dict[str, tuple[str, ...]] = {
    "kettle": ("lid", "handle", "spout", "base"),
    "lamp": ("shade", "switch", "bulb", "cord"),
    "chair": ("seat", "legs", "back", "cushion"),
    "backpack": ("straps", "zipper", "pocket", "fabric"),
    "headphones": ("sound", "cable", "pads", "band"),
    "blender": ("blades", "jar", "motor", "buttons"),
    "toaster": ("slots", "lever", "dial", "timer"),
    "umbrella": ("canopy", "handle", "frame", "button"),
    "phone": ("screen", "battery", "speaker", "case"),
    "bike": ("seat", "gears", "brakes", "chain"),
    "watch": ("strap", "face", "battery", "clasp"),
    "mug": ("handle", "rim", "glaze", "lid"),
    "jacket": ("zipper", "hood", "sleeves", "lining"),
    "tent": ("poles", "door", "floor", "pegs"),
    "camera": ("lens", "flash", "battery", "grip"),
    "desk": ("drawer", "top", "legs", "surface"),
}
PRODUCTS: tuple[str, ...] = tuple(PARTS)
COLORS: tuple[str, ...] = (
    "red", "blue", "green", "black", "white", "grey", "pink", "yellow",
    "silver", "brown", "orange", "purple", "golden", "navy", "beige", "teal",
)
PLURAL = frozenset({"headphones", "legs", "straps", "pads", "blades", "buttons", "slots", "gears", "brakes",
                    "sleeves", "poles", "pegs"})
NOUNS = frozenset(PRODUCTS) | frozenset(p for parts in PARTS.values() for p in parts)

# Polarity lexicons: the sign is the sentiment, the magnitude its strength.
ADJECTIVES = {
    "excellent": 1.0, "great": 0.9, "lovely": 0.8, "good": 0.6, "nice": 0.6, "solid": 0.5, "fine": 0.2,
    "okay": 0.0, "cheap": -0.3, "weak": -0.5, "bad": -0.6, "flimsy": -0.6, "poor": -0.7, "awful": -0.9,
    "terrible": -1.0,
}
VERBS = {"love": 1.0, "like": 0.6, "dislike": -0.6, "hate": -1.0}
ADVERBS = {"perfectly": 1.0, "well": 0.6, "okay": 0.0, "poorly": -0.6, "badly": -0.8}
TIMES = ("day", "week", "month")
PLACES = ("kitchen", "office", "son", "daughter", "trip", "home")
VERY = 1.25  # "very" strengthens an adjective's polarity by this factor (clipped to [-1, 1])
REBUY = 0.8  # polarity of "i would buy it again" (negated: -0.8)
BROKE = -1.0  # polarity of "the N broke after a week"

# Gold score weights. The positive terms sum to 1.0 so a perfect review scores exactly 1.0.
W_SENTIMENT, W_PRODUCT, W_PARTS, W_LENGTH = 0.45, 0.2, 0.15, 0.2
W_BROKEN, W_REPEAT, W_OFF_TOPIC = 0.8, 0.5, 0.3
# Length credit by sentence count: 2-4 sentences is "moderate"; 6 or more gets nothing.
LENGTH_CREDIT = {1: 0.4, 2: 0.8, 3: 1.0, 4: 0.8, 5: 0.4}
MAX_WORDS = 40  # longer texts get no length credit at all


def prompt(product: str, color: str) -> str:
    """The policy's prompt, e.g. ``"<review> product: red kettle"`` (no trailing space)."""
    return f"{ACTION} product: {color} {product}"


def meta(product: str, color: str) -> dict:
    """The row metadata the gold scorer reads."""
    return {"product": product, "color": color}


def parse_prompt(text: str) -> dict:
    """Recover ``meta`` from a review prompt; raises ValueError when no known product is named."""
    words = text.replace(ACTION, " ").split()
    products = [w for w in words if w in PARTS]
    if not products:
        raise ValueError(f"not a review prompt: {text!r}")
    colors = [w for w in words if w in COLORS]
    return meta(products[-1], colors[-1] if colors else "")


# ---------------------------------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class Sentence:
    """One parsed sentence: ``polarity`` in [-1, 1] and the nouns it names; ``ok`` False when outside the grammar."""

    ok: bool
    polarity: float = 0.0
    nouns: tuple[str, ...] = ()


_BROKEN = Sentence(ok=False)


def _copula(noun: str) -> str:
    return "are" if noun in PLURAL else "is"


def parse_sentence(words: list[str]) -> Sentence:
    """Parse one sentence (its words, without the final ``"."``) against the grammar."""
    n = len(words)
    if n >= 4 and words[0] == "the" and words[1] in NOUNS and words[2] == _copula(words[1]):
        rest = words[3:]
        if len(rest) == 1 and rest[0] in ADJECTIVES:
            return Sentence(True, ADJECTIVES[rest[0]], (words[1],))
        if len(rest) == 2 and rest[0] == "very" and rest[1] in ADJECTIVES:
            return Sentence(True, max(-1.0, min(1.0, VERY * ADJECTIVES[rest[1]])), (words[1],))
        return _BROKEN
    if n == 4 and words[0] == "i" and words[1] in VERBS and words[2] == "the" and words[3] in NOUNS:
        return Sentence(True, VERBS[words[1]], (words[3],))
    if n == 3 and words[:2] == ["it", "works"] and words[2] in ADVERBS:
        return Sentence(True, ADVERBS[words[2]])
    if words == ["i", "would", "buy", "it", "again"]:
        return Sentence(True, REBUY)
    if words == ["i", "would", "not", "buy", "it", "again"]:
        return Sentence(True, -REBUY)
    if n == 6 and words[0] == "the" and words[1] in NOUNS and words[2:5] == ["broke", "after", "a"] \
            and words[5] in TIMES:
        return Sentence(True, BROKE, (words[1],))
    if n == 7 and words[:3] == ["i", "bought", "this"] and words[3] in PARTS and words[4:6] == ["for", "my"] \
            and words[6] in PLACES:
        return Sentence(True, 0.0, (words[3],))
    return _BROKEN


def split_sentences(text: str) -> list[list[str]]:
    """Split text on the ``"."`` word. Words after the last ``"."`` form a final (unterminated) sentence."""
    sentences, current = [], []
    for word in text.split():
        if word == ".":
            sentences.append(current)
            current = []
        else:
            current.append(word)
    if current:
        sentences.append(current + [None])  # the None marks "no full stop": never matches the grammar
    return sentences


# ------------------------------------------------------------------------------------------------- gold score


def gold_score(product: str, completion_text: str) -> float:
    """Deterministic review quality in [-1, 1] for a review of ``product``; never raises on any string.

    With S the sentences (split on the word ``"."``; an empty sentence or one without a final ``"."`` is broken),
    V the well-formed sentences about this product (noun = the product or one of its parts, or no noun),
    U the distinct sentences of V:

        score = 0.45 * mean polarity over U
              + 0.20 * [the product is named in V]
              + 0.15 * min(#distinct own parts named in V, 2) / 2
              + 0.20 * length credit (by |S|: 1→0.4, 2→0.8, 3→1.0, 4→0.8, 5→0.4, else 0; 0 above 40 words)
              - 0.80 * broken / |S|  - 0.50 * repeated / |S|  - 0.30 * off-topic / |S|

    clipped to [-1, 1]; empty or whitespace-only text scores -1. "repeated" counts sentences equal to an
    earlier one; "off-topic" counts well-formed sentences naming a noun that belongs to no part of this product.
    """
    words = completion_text.split()
    if not words:
        return -1.0
    sentences = split_sentences(completion_text)
    own = {product, *PARTS.get(product, ())}
    seen: set[tuple] = set()
    broken = repeated = off_topic = 0
    polarities: list[float] = []
    named: set[str] = set()
    for sent in sentences:
        key = tuple(sent)
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        parsed = parse_sentence(sent) if sent and None not in sent else _BROKEN
        if not parsed.ok:
            broken += 1
        elif any(noun not in own for noun in parsed.nouns):
            off_topic += 1
        else:
            polarities.append(parsed.polarity)
            named.update(parsed.nouns)
    n = len(sentences)
    sentiment = sum(polarities) / len(polarities) if polarities else 0.0
    mentions_product = 1.0 if product in named else 0.0
    parts = min(len(named - {product}), 2) / 2
    length = LENGTH_CREDIT.get(n, 0.0) if len(words) <= MAX_WORDS else 0.0
    score = (W_SENTIMENT * sentiment + W_PRODUCT * mentions_product + W_PARTS * parts + W_LENGTH * length
             - W_BROKEN * broken / n - W_REPEAT * repeated / n - W_OFF_TOPIC * off_topic / n)
    return max(-1.0, min(1.0, score))


# ------------------------------------------------------------------------------------------ writing reviews


@dataclass(frozen=True)
class Style:
    """How a population of writers behaves; each probability is per review unless said otherwise.

    ``stance`` weights (positive, mixed, negative) reviews; ``lengths`` weights 1..len(lengths) sentences.
    """

    stance: tuple[float, float, float]
    lengths: tuple[float, ...]
    p_repeat: float  # one sentence written twice
    p_broken: float  # one sentence garbled (swapped/dropped word, wrong agreement, missing full stop)
    p_off_topic: float  # one sentence about another product's parts


# Web text (pretraining): more negative, longer, sloppier. Demonstrations (SFT): better but far from perfect.
WEB = Style(stance=(0.3, 0.3, 0.4), lengths=(0.1, 0.15, 0.2, 0.2, 0.15, 0.1, 0.1),
            p_repeat=0.25, p_broken=0.4, p_off_topic=0.15)
DEMO = Style(stance=(0.5, 0.3, 0.2), lengths=(0.15, 0.3, 0.3, 0.15, 0.1),
             p_repeat=0.12, p_broken=0.12, p_off_topic=0.06)


def _pick_by_sign(rng: random.Random, lexicon: dict[str, float], sign: int) -> str:
    words = sorted(w for w, v in lexicon.items() if (v > 0 if sign > 0 else v < 0 if sign < 0 else v == 0))
    return rng.choice(words)


def _noun_sentence(rng: random.Random, noun: str, sign: int) -> list[str]:
    kind = rng.random()
    if kind < 0.55:
        adj = _pick_by_sign(rng, ADJECTIVES, sign)
        very = ["very"] if sign != 0 and rng.random() < 0.25 else []
        return ["the", noun, _copula(noun), *very, adj]
    if kind < 0.85 and sign != 0:
        return ["i", _pick_by_sign(rng, VERBS, sign), "the", noun]
    if sign < 0:
        return ["the", noun, "broke", "after", "a", rng.choice(TIMES)]
    return ["the", noun, _copula(noun), _pick_by_sign(rng, ADJECTIVES, sign or 1)]


def _sentence(rng: random.Random, product: str, sign: int, first: bool) -> list[str]:
    """One well-formed sentence of the given sentiment sign; the first sentence usually names the product."""
    r = rng.random()
    if first and r < 0.85:
        return _noun_sentence(rng, product, sign)
    if r < 0.6:
        return _noun_sentence(rng, rng.choice(PARTS[product]), sign)
    if r < 0.75:
        return ["it", "works", _pick_by_sign(rng, ADVERBS, sign)]
    if r < 0.9 and sign != 0:
        return ["i", "would", "buy", "it", "again"] if sign > 0 else ["i", "would", "not", "buy", "it", "again"]
    return ["i", "bought", "this", product, "for", "my", rng.choice(PLACES)]


def _garble(rng: random.Random, words: list[str]) -> list[str]:
    """Break a sentence the way sloppy writing does; the result is outside the grammar."""
    words = list(words)
    kind = rng.randrange(3)
    if kind == 0 and len(words) >= 3:  # swap two neighbouring words
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        return words
    if kind == 1 and ("is" in words or "are" in words):  # wrong agreement
        return ["are" if w == "is" else "is" if w == "are" else w for w in words]
    return words[: max(1, len(words) - 1)] + ["the"]  # trailing article: an unfinished thought


def write_review(rng: random.Random, product: str, style: Style) -> str:
    """Sample one review of ``product`` in ``style``; returns the text with a leading space, e.g. " the ... ."."""
    stance = rng.choices(("positive", "mixed", "negative"), weights=style.stance)[0]
    n = rng.choices(range(1, len(style.lengths) + 1), weights=style.lengths)[0]
    sentences = []
    for i in range(n):
        if stance == "mixed":
            sign = rng.choice((1, 0, -1))
        else:
            sign = (1 if stance == "positive" else -1) if rng.random() < 0.85 else 0
        sentences.append(_sentence(rng, product, sign, first=i == 0))
    if rng.random() < style.p_off_topic:
        other = rng.choice([p for p in PRODUCTS if p != product])
        part = rng.choice([q for q in PARTS[other] if q not in PARTS[product]])
        sentences[rng.randrange(n)] = _noun_sentence(rng, part, rng.choice((1, -1)))
    if rng.random() < style.p_repeat:
        i = rng.randrange(n)
        sentences.insert(i + 1, sentences[i])
    text = " ".join(" ".join(s) + " ." for s in sentences)
    if rng.random() < style.p_broken:
        i = rng.randrange(len(sentences))
        garbled = _garble(rng, sentences[i])
        sentences[i] = garbled
        text = " ".join(" ".join(s) + " ." for s in sentences)
        if rng.random() < 0.3:  # or a missing final full stop
            text = text[:-2]
    return " " + text
