"""The tiny model and stage-1 packs the memory-plan tests estimate and measure (shared by the test and its
measuring subprocess)."""

import torch

from moca_fast.config import ModelSpec
from moca_fast.data.loader import MaskedDocuments, PackCollator
from moca_fast.data.processor import Processor
from moca_fast.data.synthetic import make_documents
from moca_fast.data.tokenizer import tiny_tokenizer
from moca_fast.model.heads import MaeHead
from moca_fast.model.moca import MocaModel
from moca_fast.model.tiny import tiny_hf_config


def tiny_spec() -> ModelSpec:
    return ModelSpec.from_hf_config(
        tiny_hf_config(
            tiny_tokenizer(), hidden_size=256, intermediate_size=512, num_layers=4, vision_hidden=64, vision_depth=3
        )
    )


def tiny_model():
    torch.manual_seed(0)
    model = MocaModel(tiny_spec(), "sdpa").init_weights()
    return model, MaeHead.from_middle_layer(model)


def tiny_pack(documents: int):
    """The first `documents` synthetic documents, masked and packed (4..64 image tokens each)."""
    processor = Processor(tiny_tokenizer(), min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, max_length=512)
    samples = MaskedDocuments(make_documents(documents, seed=0), processor)
    return PackCollator(processor)([samples[(0, i)] for i in range(documents)])
