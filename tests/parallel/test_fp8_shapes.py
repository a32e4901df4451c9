"""FP8 on the first GPU run: every float8 GEMM of a converted decoder layer meets CUDA `torch._scaled_mm`'s shape
and layout rules over packs of many lengths, forward and backward. The CPU build checks none of them, so a stand-in
replaces `torch._scaled_mm` that raises where CUDA would and otherwise computes the scaled product in fp32."""

import pytest
import torch
from torch import nn

import moca_fast.parallel.parallelize as parallelize_module
from moca_fast.config import ModelSpec
from moca_fast.model.attention import Segments
from moca_fast.model.text import DecoderLayer, text_rotary
from moca_fast.model.tiny import tiny_hf_config

pytest.importorskip("torchao.float8")

PACK_LENGTHS = range(1, 61)  # 60 packed token counts, 56 of them not a multiple of 16


def cuda_scaled_mm(calls: list, check: bool = True):
    """torch._scaled_mm as CUDA's checks see it (row-major mat1, column-major mat2, mat1's columns and both of
    mat2's dimensions multiples of 16), computed in fp32 when they pass (`check=False`: any shape)."""

    def scaled_mm(mat1, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        if not check:
            pass
        elif mat1.shape[1] % 16 or mat2.shape[0] % 16 or mat2.shape[1] % 16:
            raise RuntimeError(
                f"_scaled_mm on CUDA: mat1 {tuple(mat1.shape)} and mat2 {tuple(mat2.shape)} must be divisible by 16"
            )
        elif mat1.stride(1) != 1 or mat2.stride(0) != 1:
            raise RuntimeError(
                f"_scaled_mm on CUDA: mat1 must be row-major and mat2 column-major, got strides "
                f"{mat1.stride()} and {mat2.stride()}"
            )
        calls.append((tuple(mat1.shape), tuple(mat2.shape)))
        out = (mat1.float() * scale_a.float()) @ (mat2.float() * scale_b.float())
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype or mat1.dtype)

    return scaled_mm


@pytest.fixture
def spec(tokenizer):
    # intermediate 1040 > 1024: gate_proj and up_proj (64 -> 1040) take float8, the narrow rest stays as it is
    return ModelSpec.from_hf_config(tiny_hf_config(tokenizer, intermediate_size=1040)).text


def converted_layer(spec, monkeypatch) -> nn.Module:
    torch.manual_seed(0)
    layer = DecoderLayer(spec)
    monkeypatch.setattr(parallelize_module, "fp8_supported", lambda device: (True, "forced for the test"))
    assert parallelize_module.convert_decoder_to_fp8(nn.ModuleList([layer]), torch.device("cpu"))
    return layer


def run_pack(layer: nn.Module, spec, tokens: int) -> None:
    """Forward and backward of one pack of `tokens` tokens in two sequences."""
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, spec.hidden_size, generator=generator, requires_grad=True)
    first = tokens // 2
    cu_seqlens = torch.tensor([0, first, tokens] if first else [0, tokens], dtype=torch.int32)
    positions = torch.cat([torch.arange(first), torch.arange(tokens - first)]).expand(3, -1)
    cos, sin = text_rotary(spec, positions)
    segments = Segments.build(cu_seqlens, int(cu_seqlens.diff().max()), tokens, "sdpa")
    layer(x, cos, sin, segments).square().mean().backward()


def test_only_layers_where_fp8_pays_are_converted(spec, monkeypatch):
    layer = converted_layer(spec, monkeypatch)
    converted = {name for name, m in layer.named_modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear}
    assert converted == {"mlp.gate_proj", "mlp.up_proj"}


def test_every_float8_gemm_meets_cuda_rules_over_many_pack_lengths(spec, monkeypatch):
    calls = []
    layer = converted_layer(spec, monkeypatch)
    monkeypatch.setattr(torch, "_scaled_mm", cuda_scaled_mm(calls))
    for tokens in PACK_LENGTHS:
        before = len(calls)
        run_pack(layer, spec, tokens)
        # 2 float8 linears x 3 GEMMs (output, input gradient, weight gradient) per pack
        assert len(calls) - before == 6, f"pack of {tokens} tokens: {len(calls) - before} float8 GEMMs"


def test_the_stand_in_rejects_unpadded_token_counts(spec, monkeypatch):
    """Without padding (torchao's default) the weight-gradient GEMM contracts over the token count: the stand-in
    raises for a 17-token pack, as CUDA does."""
    from torchao.float8 import Float8LinearConfig

    monkeypatch.setattr(parallelize_module, "fp8_config", lambda: Float8LinearConfig())
    layer = converted_layer(spec, monkeypatch)
    monkeypatch.setattr(torch, "_scaled_mm", cuda_scaled_mm([]))
    with pytest.raises(RuntimeError, match="divisible by 16"):
        run_pack(layer, spec, 17)


def test_padding_is_exact(spec, monkeypatch):
    """The padded GEMMs give the gradients of the same float8 arithmetic without padding (the stand-in takes
    any shape when its checks are off)."""
    from torchao.float8 import Float8LinearConfig

    grads = []
    for config in (parallelize_module.fp8_config(), Float8LinearConfig()):
        monkeypatch.setattr(parallelize_module, "fp8_config", lambda config=config: config)
        layer = converted_layer(spec, monkeypatch)
        monkeypatch.setattr(torch, "_scaled_mm", cuda_scaled_mm([], check=False))
        run_pack(layer, spec, 23)
        grads.append({name: p.grad.clone() for name, p in layer.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7, msg=name)
