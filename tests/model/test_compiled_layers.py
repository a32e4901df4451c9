"""Compile that stays compiled: the decoder layers, vision blocks and MAE layer compiled as the trainers compile
them (moca_fast/parallel/parallelize.py) run packs of changing lengths with a bounded number of compiled graphs, no
graph breaks and no fallback to eager — on the CPU's SDPA path and on the CUDA path's varlen_attn (through the CPU
oracle of its op)."""

import pytest
import torch
from torch._dynamo.utils import counters

from moca_fast.config import ModelSpec
from moca_fast.data.batch import pack_sequences
from moca_fast.data.masking import apply_mae, apply_mlm
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.model.heads import MaeHead
from moca_fast.model.moca import MocaModel
from moca_fast.model.tiny import tiny_hf_config
from moca_fast.parallel.parallelize import parallelize

from .varlen_oracle import cpu_varlen_attention


def _packs(processor, make_image):
    """Five stage-1 micro-batches of different lengths, image sizes and document counts."""
    g = torch.Generator().manual_seed(0)
    for n in range(5):
        docs = [
            processor.encode(
                f"{IMAGE_PLACEHOLDER} words " + "x " * (3 * n + 1), [make_image(56 + 28 * n, 84)], f"a{n}"
            ),
            processor.encode("some text " * (2 * n + 2), [], f"b{n}"),
        ]
        if n % 2:
            docs.append(processor.encode("third " * (5 + n), [], f"c{n}"))
        masked = [
            apply_mae(
                apply_mlm(
                    d, mask_token_id=processor.mask_token_id, special_ids=processor.special_ids, rate=0.4, generator=g
                ),
                image_token_id=processor.image_token_id,
                rate=0.5,
                generator=g,
            )
            for d in docs
        ]
        yield pack_sequences(masked, processor.image_token_id)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_compiled_blocks_stay_compiled_over_pack_lengths(tokenizer, processor, make_image, backend):
    # A fallback to eager raises. dynamo's own patch, not monkeypatch: pytest >= 9.2 undoes a setattr on this
    # config module by deleting the key (the module keeps its values outside its __dict__).
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        _run_over_five_packs(tokenizer, processor, make_image, backend)


def _run_over_five_packs(tokenizer, processor, make_image, backend):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MocaModel(ModelSpec.from_hf_config(tiny_hf_config(tokenizer)), backend).init_weights()
    mae = MaeHead.from_middle_layer(model)
    parallelize(
        model,
        [*model.language_model.layers, *model.visual.blocks, mae.layer],
        extra=mae,
        device=torch.device("cpu"),
        fp8_layers=None,
        activation_checkpointing=True,
        compile=True,
        world_size=1,
    )
    graphs, lengths = [], []
    with cpu_varlen_attention():
        for batch in _packs(processor, make_image):
            hidden = model(batch)
            (hidden.float().pow(2).mean() + mae.features(hidden, batch, backend).float().pow(2).mean()).backward()
            graphs.append(counters["stats"]["unique_graphs"])
            lengths.append(batch.num_tokens)
    assert len(set(lengths)) == 5
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # Decoder layer, vision block, MAE layer (and a re-specialisation or two for one-segment packs): bounded,
    # whatever the number of layers and pack lengths — and nothing new once every kind of pack has been seen.
    assert graphs[-1] <= 6 and graphs[-1] == graphs[-2], graphs
    assert graphs[1] == graphs[0], graphs  # a new length (and document count) is not a new graph: dynamic at once
