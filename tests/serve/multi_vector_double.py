"""A test double of a checkpoint trained with a multi-vector head and Matryoshka dimensions, and `moca-fast serve`
of it (`python -m tests.serve.multi_vector_double` takes serve's flags).

It meets the contract the server is written against (MocaEmbedder.matryoshka_dims, .multi_vector_dim and
`embed_packed(batch, output="multi_vector")` -> per input a [tokens, multi_vector_dim] tensor, in batch order) on top
of the tiny model: a fixed random projection of every final hidden state, L2-normalised per token. The server's
multi-vector tests use it until a real multi-vector checkpoint exists; point them at one then.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.nn.functional as F

from moca_fast.cli import add_model_arguments
from moca_fast.data.batch import PackedBatch
from moca_fast.embed import MocaEmbedder, as_input, encode_input
from moca_fast.serve.settings import add_serve_arguments, check_serve_arguments, settings_from_args


class MultiVectorDouble(MocaEmbedder):
    matryoshka_dims = (32, 16)
    multi_vector_dim = 8

    def projection(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(self.dim, self.multi_vector_dim, generator=generator)

    def embed_packed(self, batch: PackedBatch, output: str = "pooled"):
        if output == "pooled":
            return super().embed_packed(batch)
        assert output == "multi_vector", output
        with torch.inference_mode():
            hidden = self.model(batch.to(self.device)).float().cpu()
        vectors = F.normalize(hidden @ self.projection(), dim=-1)
        return list(vectors.split(batch.cu_seqlens.diff().tolist()))

    def multi_vectors(self, item) -> torch.Tensor:
        """One input's multi-vectors, alone in its forward (the tests' oracle)."""
        sequence = encode_input(self.processor, as_input(item, "oracle"))
        return self.embed_packed(self.collator()([sequence]), output="multi_vector")[0]


def main() -> None:
    parser = argparse.ArgumentParser(prog="multi_vector_double")
    add_serve_arguments(parser)
    add_model_arguments(parser)
    args = parser.parse_args()
    check_serve_arguments(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from moca_fast.serve.app import serve

    embedder = MultiVectorDouble.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    serve(embedder, settings_from_args(args, embedder.batch_tokens, embedder.processor.max_length), args.host,
          args.port)


if __name__ == "__main__":
    main()
