"""Tokenizers: `<|mask|>` becomes the mask token of a Qwen-structured tokenizer without touching Qwen's own special
tokens, which stay special (never MLM-masked) and are saved whole with checkpoints."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moca_fast.data.masking import apply_mlm
from moca_fast.data.processor import Processor
from moca_fast.data.tokenizer import load_tokenizer, tiny_tokenizer
from moca_fast.data.tokens import MASK_TOKEN

# Qwen2.5-VL's tokenizer: <|endoftext|> is the pad token, <|im_end|> the end of sequence, and these its
# additional special tokens (tokenizer_config.json of Qwen/Qwen2.5-VL-3B-Instruct).
QWEN_SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def qwen_structured_tokenizer(path):
    """A small byte-level BPE saved with Qwen's special-token layout, as a checkpoint directory holds it."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer=trainer)
    bpe.add_special_tokens(["<|endoftext|>", *QWEN_SPECIAL])
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIAL
    ).save_pretrained(path)
    return path


def test_mask_token_added_without_touching_qwen_special_tokens(tmp_path):
    tokenizer = load_tokenizer(qwen_structured_tokenizer(tmp_path / "qwen"))
    assert tokenizer.mask_token == MASK_TOKEN and tokenizer.mask_token_id == len(tokenizer) - 1
    assert set(QWEN_SPECIAL + ["<|endoftext|>", MASK_TOKEN]) <= set(tokenizer.all_special_tokens)
    tokenizer.save_pretrained(tmp_path / "saved")  # what a checkpoint holds, loaded again: unchanged, no new id
    again = load_tokenizer(tmp_path / "saved")
    assert again.all_special_tokens == tokenizer.all_special_tokens and len(again) == len(tokenizer)
    assert again.mask_token_id == tokenizer.mask_token_id


def test_qwen_special_tokens_are_never_mlm_masked(tmp_path):
    tokenizer = load_tokenizer(qwen_structured_tokenizer(tmp_path / "qwen"))
    processor = Processor(tokenizer)
    image_tokens = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")  # only as the image placeholder
    text = "the fox" + "".join(t for t in QWEN_SPECIAL if t not in image_tokens) + "lazy dog"
    seq = processor.encode(text + "<|endoftext|><|mask|>", [], "s")
    masked = apply_mlm(
        seq,
        mask_token_id=processor.mask_token_id,
        special_ids=processor.special_ids,
        rate=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    special = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL + ["<|endoftext|>", MASK_TOKEN]]
    kept = torch.isin(seq.input_ids, torch.tensor(special))
    assert kept.sum() == len(QWEN_SPECIAL) - 3 + 2  # every special token of the text was encoded as one id
    assert torch.equal(masked.input_ids[kept], seq.input_ids[kept])  # ... and survived a masking rate of 1
    assert (masked.input_ids[~kept] == processor.mask_token_id).all()  # every other token was masked


def test_tiny_tokenizer_has_the_mask_token():
    tokenizer = tiny_tokenizer()
    assert tokenizer.mask_token == MASK_TOKEN and MASK_TOKEN in tokenizer.all_special_tokens
