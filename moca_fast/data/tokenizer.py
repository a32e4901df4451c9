"""Tokenizers: the real Qwen2.5-VL one from a local directory, and an offline byte-level BPE for tests and the demo.

`<|mask|>` is the tokenizer's mask token, as the reference adds it: Qwen's own special tokens (`<|im_start|>`,
`<|box_start|>`, `<|vision_pad|>`, ...) stay in its list of special tokens, so they are never MLM-masked and
checkpoints save the list whole. The offline tokenizer is trained in memory, deterministically, on a small
built-in corpus, and carries the Qwen special tokens the model needs (`<|endoftext|>`, `<|vision_start|>`,
`<|vision_end|>`, `<|image_pad|>`) plus `<|mask|>`, so every code path that uses a real tokenizer runs without a
hub.
"""

from __future__ import annotations

import functools
import os

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .tokens import IMAGE_PAD_TOKEN, MASK_TOKEN, PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN

SPECIAL_TOKENS = (PAD_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN, MASK_TOKEN)

_CORPUS = """
Represent the given image with the following question:
Find me an everyday image that matches the given caption:
Represent the given image. Represent the given document image.
a red circle on the left. two blue squares at the top right. one green triangle in the bottom left corner.
yellow purple orange black white gray pink brown cyan magenta star cross diamond hexagon ring
how many shapes are there? what colour is the shape? where is the triangle? which word is written?
The quick brown fox jumps over the lazy dog. A page of a document with a table, a chart and some text.
zero one two three four five six seven eight nine ten small large big tiny center middle above below
The report says revenue grew by twelve percent in the third quarter while costs stayed flat.
Question: what is shown in the picture? Answer: a picture of several coloured shapes on a plain background.
"""


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer saved in a local directory (a Qwen2.5-VL checkpoint or processor directory), with `<|mask|>` as
    its mask token (a new id unless the vocabulary has it); no hub."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.mask_token != MASK_TOKEN:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})  # not additional_special_tokens: that replaces Qwen's
    return tokenizer


@functools.cache
def tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE of at most `vocab_size` ids; the special tokens take the last ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.split("\n") * 4, trainer=trainer)
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN],
    )
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tiny tokenizer has {len(tokenizer)} ids, more than vocab_size={vocab_size}")
    return tokenizer
