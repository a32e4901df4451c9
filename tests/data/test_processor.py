"""Processor: pixels equal transformers' Qwen2-VL image processor (transparency too); bad input raises errors naming
the sample."""

import pytest
import torch

from moca_fast.data.batch import pack_sequences
from moca_fast.data.image_patches import image_to_patches, smart_resize
from moca_fast.data.images import load_image
from moca_fast.data.tokens import IMAGE_PLACEHOLDER


@pytest.mark.parametrize("size", [(100, 77), (20, 300), (900, 1200), (28, 28)])
def test_patches_equal_transformers_image_processor(make_image, size):
    from transformers import Qwen2VLImageProcessorPil

    image = make_image(*size)
    # The reference raises a side under 28 px to 28 before the processor (4.50's smart_resize rejected it).
    raised = image.resize((max(size[1], 28), max(size[0], 28)), resample=3) if min(size) < 28 else image
    hf = Qwen2VLImageProcessorPil()(
        images=[raised], return_tensors="pt", size={"shortest_edge": 256 * 28 * 28, "longest_edge": 1024 * 28 * 28}
    )
    rows, grid = image_to_patches(image)
    assert torch.equal(torch.tensor([grid]), hf["image_grid_thw"])
    torch.testing.assert_close(rows, hf["pixel_values"], atol=1e-5, rtol=0)


def test_reference_pixel_budget():
    # the reference's budget: 256..1024 LLM tokens per image (4 patches each), sides in 28-multiples.
    for h, w in [(10, 10), (4000, 3000), (224, 224), (1000, 30)]:
        hb, wb = smart_resize(max(h, 28), max(w, 28))
        assert hb % 28 == 0 and wb % 28 == 0
        assert 256 <= hb * wb // 28**2 <= 1024


def test_small_image_side_is_raised_to_28(processor, make_image):
    seq = processor.encode(f"{IMAGE_PLACEHOLDER}", [make_image(5, 200)], "thin")
    assert seq.image_grid_thw[0, 1] >= 2 and seq.image_grid_thw[0, 2] >= 2


def test_image_tokens_expand_to_grid(processor, make_image):
    seq = processor.encode(f"x{IMAGE_PLACEHOLDER}y", [make_image(84, 112)], "s")
    t, h, w = seq.image_grid_thw[0].tolist()
    assert int((seq.input_ids == processor.image_token_id).sum()) == t * h * w // 4
    assert seq.pixel_values.shape == (t * h * w, 1176)


def test_missing_image_names_the_sample(processor, make_image):
    with pytest.raises(ValueError, match=r"sample doc-7: 2 image placeholders .* but 1 images"):
        processor.encode(f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}", [make_image(56, 56)], "doc-7")


def test_image_over_pixel_budget_names_the_sample(processor, make_image):
    with pytest.raises(ValueError, match=r"sample wide-3: image 0: .*(aspect ratio|pixel budget)"):
        processor.encode(IMAGE_PLACEHOLDER, [make_image(28, 28 * 250)], "wide-3")
    with pytest.raises(ValueError, match=r"sample wide-4: image 0: .*pixel budget"):
        processor.encode(IMAGE_PLACEHOLDER, [make_image(28, 28 * 150)], "wide-4")


def test_empty_sequence_names_the_sample(processor):
    with pytest.raises(ValueError, match="sample empty-1: empty sequence"):
        processor.encode("", [], "empty-1")


def test_token_patch_mismatch_names_the_sample(processor, make_image):
    seq = processor.encode(f"{IMAGE_PLACEHOLDER}caption", [make_image(56, 84)], "bad-9")
    seq.pixel_values = seq.pixel_values[:-4]
    seq.image_grid_thw = torch.tensor([[1, 4, 5]])
    with pytest.raises(ValueError, match="sample bad-9: token/patch count mismatch"):
        pack_sequences([seq], processor.image_token_id)


def test_truncation_drops_a_cut_image_with_its_pixels(tokenizer, make_image):
    from moca_fast.data.processor import Processor

    full = Processor(tokenizer, min_pixels=16 * 28 * 28, max_pixels=16 * 28 * 28)
    text = f"intro words {IMAGE_PLACEHOLDER} middle {IMAGE_PLACEHOLDER} tail"
    images = [make_image(112, 112), make_image(112, 112)]
    whole = full.encode(text, images, "t")
    second_start = torch.nonzero(whole.input_ids == full.vision_start_id).flatten()[1].item()
    cut = Processor(tokenizer, min_pixels=16 * 28 * 28, max_pixels=16 * 28 * 28, max_length=second_start + 5)
    seq = cut.encode(text, images, "t")
    assert seq.dropped_images == 1
    assert len(seq) == second_start  # cut at the cut image's vision-start token
    assert seq.image_grid_thw.shape[0] == 1 and seq.pixel_values.shape[0] == 64
    assert torch.equal(seq.pixel_values, whole.pixel_values[:64])
    assert torch.equal(seq.position_ids, whole.position_ids[:, :second_start])
    batch = pack_sequences([seq, whole], cut.image_token_id)
    assert batch.cu_seqlens.tolist() == [0, len(seq), len(seq) + len(whole)]
    assert batch.image_token_index.numel() * 4 == batch.pixel_values.shape[0]


@pytest.mark.parametrize("max_length", [None, 10, 40, 75, 200])
def test_count_tokens_equals_encoded_length(tokenizer, make_image, max_length):
    from moca_fast.data.processor import Processor

    proc = Processor(tokenizer, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, max_length=max_length)
    text = f"some words {IMAGE_PLACEHOLDER} more words here {IMAGE_PLACEHOLDER} tail"
    images = [make_image(150, 90), make_image(20, 400)]
    seq = proc.encode(text, images, "c")
    assert proc.count_tokens(text, [im.size for im in images], "c") == len(seq)
    assert int((seq.input_ids == proc.image_token_id).sum()) * 4 == seq.pixel_values.shape[0]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white_as_transformers_does(make_image, mode):
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    rgba = make_image(60, 90).convert("RGBA")
    alpha = torch.zeros(60, 90, dtype=torch.uint8)
    alpha[:, 30:] = 128  # transparent, half transparent, opaque
    alpha[:, 60:] = 255
    rgba.putalpha(Image.fromarray(alpha.numpy()))
    image = rgba.convert(mode) if mode != "P" else rgba.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P":
        image.info["transparency"] = 0
    hf = Qwen2VLImageProcessorPil()(
        images=[image], return_tensors="pt", size={"shortest_edge": 256 * 28 * 28, "longest_edge": 1024 * 28 * 28}
    )
    rows, grid = image_to_patches(image)
    assert torch.equal(torch.tensor([grid]), hf["image_grid_thw"])
    torch.testing.assert_close(rows, hf["pixel_values"], atol=1e-5, rtol=0)
    loaded = load_image(image, "s")
    assert loaded.getpixel((0, 0)) == (255, 255, 255)  # fully transparent: white, as transformers makes it


def test_a_bare_image_pad_in_the_text_names_the_sample(processor, make_image):
    with pytest.raises(ValueError, match=r"sample stray-2: the text holds a bare <\|image_pad\|> outside an image"):
        processor.encode(f"look <|image_pad|> here {IMAGE_PLACEHOLDER}", [make_image(56, 56)], "stray-2")
    with pytest.raises(ValueError, match=r"sample stray-3: the text holds a bare <\|image_pad\|>"):
        processor.count_tokens("only <|image_pad|>", [], "stray-3")


def test_token_ids_equal_the_tokenizers_own_call_fresh_memoised_and_in_a_copy(processor, tokenizer):
    """The batch call and the memo of recent pieces give the ids of `tokenizer(piece)`, special tokens, repeats and
    a piece too long to memoise included, also after a padded call of the same tokenizer; a pickled copy (a
    DataLoader worker's) computes the same."""
    import pickle
    import random

    rng = random.Random(7)
    words = ["page", " revenue", "<|endoftext|>", "<|mask|>", "Query:", " é", "\n", "  ", "123", "图"]
    pieces = ["".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(40)]
    pieces += [pieces[3], "x" * 3000, "x" * 3000]
    expected = [tokenizer(p, add_special_tokens=False).input_ids for p in pieces]
    tokenizer(["a", "a b c"], padding=True)  # a padded call leaves padding set in the fast tokenizer's backend
    for source in (processor, processor, pickle.loads(pickle.dumps(processor))):
        assert [ids.tolist() for ids in source._token_ids(pieces)] == expected
    assert "x" * 3000 not in processor._recent_ids and pieces[3] in processor._recent_ids
