"""Train the demo world's tokenizer: a small byte-level BPE with one token per digit.

Contract of the returned ``PreTrainedTokenizerFast``:

- special tokens ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``, four distinct ids (pad != eos, so padding is never
  mistaken for the end of a completion);
- encoding with ``add_special_tokens=True`` (the default) prepends ``<bos>`` and never appends ``<eos>`` —
  callers append ``eos_token_id`` to completions themselves;
- every digit is its own token (arithmetic is learnable digit by digit);
- byte-level: ``decode(encode(x, add_special_tokens=False)) == x`` for any text, spaces included
  (``clean_up_tokenization_spaces`` is off, or " ." would lose its space);
- a Jinja ``chat_template`` (see :data:`CHAT_TEMPLATE`); ``model_max_length`` 256; ``padding_side`` left at the
  default "right" (callers set it);
- it round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
MODEL_MAX_LENGTH = 256

# One line per turn: "<|user|> {content}\n" and "<|assistant|> {content}<eos>\n". The assistant content is
# wrapped in {% generation %} so `return_assistant_tokens_mask=True` (TRL's assistant_only_loss) masks the loss
# to it. The space after the assistant header lives inside the generation block, so the generation prompt ends
# with "<|assistant|>" and the model's first token carries the space — the same convention as prompt/completion
# rows (completions start with a space).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on ``texts``; deterministic for the same texts.

    ``vocab_size`` counts the 4 special tokens and the 256 byte symbols, so it must be above 260.
    """
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (specials + bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Digits first, each alone, so BPE can never merge "85" or " 8"; then GPT-2 byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes without <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
