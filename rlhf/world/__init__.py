"""The embedded demo world: two tasks with hidden gold scorers, a tokenizer trainer, a tiny LM builder and
simulated annotators — everything the RLHF pipeline needs to run offline on a laptop CPU.

Public API (other modules code against exactly these names):

- ``ACTION_TOKENS``, ``TASKS`` — the task-selecting special tokens ``["<add>", "<review>"]`` and the tasks
  ``("add", "review")``, their chat forms (``rlhf.world.chat``) and image forms (``"image_add"``, ``"image_review"``:
  ``rlhf.world.vision``, which also renders the image classification sets)
- ``gold_score`` / ``gold_scores`` — the hidden deterministic judge; ``gold_score_fn`` (the judge as an evaluation
  score function) and ``gold_task_records`` (the records it can judge) for the engine's gold evaluation
- ``train_tokenizer`` — byte-level BPE, one token per digit, ``<pad> <bos> <eos> <unk>``, chat template
- ``build_tiny_lm`` / ``MODEL_SIZES`` — a Llama-style causal LM from a config ("nano", "tiny", "small");
  ``scratch_builder`` hands it to ``PolicyModel.load`` for ``model.scratch_size``
- ``SimulatedAnnotator`` — Bradley-Terry-noisy pairwise preferences from the gold score

Data files are written by ``python -m rlhf.world.generate_data --out data/demo`` (``--vision --out DIR``: the
rendered images and their files, which are not committed).
"""

from rlhf.world.annotators import SimulatedAnnotator
from rlhf.world.model import MODEL_SIZES, build_tiny_lm, scratch_builder
from rlhf.world.tasks import ACTION_TOKENS, TASKS, gold_score, gold_score_fn, gold_scores, gold_task_records
from rlhf.world.tokenizer import train_tokenizer

__all__ = [
    "ACTION_TOKENS",
    "TASKS",
    "gold_score",
    "gold_scores",
    "gold_score_fn",
    "gold_task_records",
    "train_tokenizer",
    "build_tiny_lm",
    "scratch_builder",
    "MODEL_SIZES",
    "SimulatedAnnotator",
]
