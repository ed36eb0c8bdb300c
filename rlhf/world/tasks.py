"""The demo world's task registry: which tasks exist, the action token that selects each, and the gold judge.

Two tasks, chosen to cover the two kinds of RLHF signal:

- ``"add"`` (:mod:`rlhf.world.arithmetic`): verifiable, binary gold score (is the final answer the sum?).
- ``"review"`` (:mod:`rlhf.world.reviews`): open-ended, continuous gold score from a hidden rubric.
- ``"chat_add"`` and ``"chat_review"`` (:mod:`rlhf.world.chat`): the same two kinds for a real chat model, with
  chat-message prompts and judges that read plain English.
- ``"image_add"`` and ``"image_review"`` (:mod:`rlhf.world.vision`): the same two kinds with the facts (the
  operands, the product) only in an image; the judges are the text tasks' own, reading the row's ``meta``.

The gold judge is hidden from the policy and the reward model: training sees it only through the simulated
annotators' noisy preferences (or, for rule-based rewards, through the verifiable ``add`` check).
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.world import arithmetic, chat, reviews, vision

# the two chat tasks (`rlhf.world.chat`) are the same two kinds of signal for a real chat model, in plain English;
# the two image tasks (`rlhf.world.vision`) the same two with the facts in an image, selected by the same action tokens
TASKS: tuple[str, ...] = ("add", "review", *chat.TASKS, *vision.TASKS)
# Special tokens that open every prompt and select its task. They are not in the base tokenizer (pretraining
# never sees them); the SFT stage adds them as additional special tokens and resizes the embeddings.
ACTION_TOKENS: list[str] = [arithmetic.ACTION, reviews.ACTION]


def gold_score(task: str, prompt: str, completion: str, meta: dict | None) -> float:
    """The hidden gold score of one completion; deterministic, and never raises on any completion string.

    ``completion`` is decoded text without the EOS token. ``meta`` is the row's metadata (as written by the data
    generator); when it lacks the task's keys they are recovered from ``prompt``.
    Returns 0.0 / 1.0 for ``"add"`` (and ``"chat_add"``, ``"image_add"``) and a float in [-1, 1] for ``"review"``
    (and ``"chat_review"``, ``"image_review"``); an image task's facts are only in ``meta`` (see
    :func:`rlhf.world.vision.gold_score`). Raises ValueError for an unknown task.
    """
    if task == "add":
        return arithmetic.gold_score(prompt, completion, meta)
    if task == "review":
        product = (meta or {}).get("product") or reviews.parse_prompt(prompt)["product"]
        return reviews.gold_score(product, completion)
    if task in chat.TASKS:
        return chat.gold_score(task, prompt, completion, meta or {})
    if task in vision.TASKS:
        return vision.gold_score(task, prompt, completion, meta)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def gold_scores(
    tasks: Sequence[str], prompts: Sequence[str], completions: Sequence[str], metas: Sequence[dict | None]
) -> list[float]:
    """:func:`gold_score` over parallel lists (all of one length, else ValueError)."""
    if not len(tasks) == len(prompts) == len(completions) == len(metas):
        raise ValueError(
            f"gold_scores needs equal lengths, got tasks={len(tasks)} prompts={len(prompts)} "
            f"completions={len(completions)} metas={len(metas)}"
        )
    return [gold_score(t, p, c, m) for t, p, c, m in zip(tasks, prompts, completions, metas)]


def gold_score_fn(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict],
                  ended: Sequence[bool]) -> list[float]:
    """:func:`gold_scores` as an evaluation score function (``rlhf.evaluation.ScoreFn``): the task and ``meta`` come
    from each completion's prompt record; ``ended`` is not used (the judge reads only the text)."""
    return gold_scores([r["task"] for r in records], prompts, completions, [r.get("meta") or {} for r in records])


def gold_task_records(records: Sequence[dict]) -> list:
    """The records the gold judge can score: those whose ``task`` is a world task (others are left out)."""
    return [r for r in records if r.get("task") in TASKS]
