"""M-RoPE ids and the vision window layout against transformers' own computations."""

import pytest
import torch

from moca_fast.data.positions import vision_layout
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.model.tiny import tiny_hf_config


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    from transformers import Qwen2_5_VLModel

    return Qwen2_5_VLModel(tiny_hf_config(tokenizer, num_layers=1, vision_depth=1))


@pytest.mark.parametrize(
    "text, sizes",
    [
        ("only words here", []),
        (f"{IMAGE_PLACEHOLDER}caption", [(84, 140)]),
        (f"a {IMAGE_PLACEHOLDER} b {IMAGE_PLACEHOLDER}", [(300, 90), (56, 56)]),
        (f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}end", [(140, 300), (200, 200)]),
    ],
)
def test_mrope_positions_equal_get_rope_index(hf_model, processor, make_image, text, sizes):
    seq = processor.encode(text, [make_image(h, w) for h, w in sizes], "s")
    token_types = (seq.input_ids == processor.image_token_id).long()[None]
    grids = seq.image_grid_thw if sizes else None
    expected, _ = hf_model.get_rope_index(seq.input_ids[None], token_types, grids)
    assert torch.equal(seq.position_ids, expected[:, 0])


@pytest.mark.parametrize("grids", [[[1, 8, 8]], [[1, 4, 6], [1, 20, 12], [1, 16, 16]], [[1, 2, 34]]])
def test_vision_layout_equals_transformers(grids):
    vision_utils = pytest.importorskip("transformers.vision_utils")
    grid_thw = torch.tensor(grids)
    layout = vision_layout(grid_thw)
    window_index, cu_window = vision_utils.get_vision_window_index(grid_thw, 2, 112, 14)
    cu = vision_utils.get_vision_cu_seqlens(grid_thw)
    pos = vision_utils.get_vision_position_ids(grid_thw, 2)
    assert torch.equal(layout.window_index, window_index)
    assert torch.equal(layout.cu_window_seqlens, cu_window)
    assert torch.equal(layout.cu_seqlens, cu.to(torch.int32))
    assert torch.equal(layout.reverse_index, torch.argsort(window_index))
    # Our rotary coordinates are stored already in window order.
    assert torch.equal(layout.position_ids, pos.reshape(-1, 4, 2)[window_index].reshape(-1, 2))
    assert layout.max_window_seqlen == int((cu_window[1:] - cu_window[:-1]).max())
