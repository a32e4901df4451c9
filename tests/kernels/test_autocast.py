"""The fused losses under autocast: bf16 operands reach the ops (what training passes them, inspected), fp32
accumulation makes the loss of fp32 inputs equal the fp64 loss of their bf16-rounded values, and gradients return
in each input's dtype."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moca_fast.data.batch import pack_sequences
from moca_fast.data.masking import apply_mae, apply_mlm
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.kernels import (
    info_nce_loss,
    info_nce_reference,
    masked_lm_ce_reference,
    masked_lm_cross_entropy,
    patch_reconstruction_loss,
    patch_reconstruction_reference,
)
from moca_fast.model.heads import MaeHead, mlm_loss

from .conftest import assert_matches, device_for

FUSED_LOSSES = ("masked_lm_ce", "patch_reconstruction", "info_nce")


class FusedLossInputs(TorchDispatchMode):
    """Records, for every call of a fused loss's op, the dtypes of its tensor arguments (None for other args)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list[tuple]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().removeprefix("moca_fast::").split(".")[0]
        if func.namespace == "moca_fast" and name in FUSED_LOSSES:
            self.calls.setdefault(name, []).append(tuple(a.dtype if torch.is_tensor(a) else None for a in args))
        return func(*args, **(kwargs or {}))


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def training_losses_under_autocast(processor, make_image) -> dict[str, list[tuple]]:
    """One stage-1 step (MLM + MAE heads) and one stage-2 loss of a tiny fp32 model under bf16 autocast, as the
    trainers run them: the dtypes that reach each fused loss's op."""
    from moca_fast.config import ModelSpec
    from moca_fast.model.moca import MocaModel
    from moca_fast.model.tiny import tiny_hf_config

    model = MocaModel(ModelSpec.from_hf_config(tiny_hf_config(processor.tokenizer)), "sdpa").init_weights()
    mae = MaeHead.from_middle_layer(model)
    g = torch.Generator().manual_seed(0)
    sequences = []
    for i in range(3):
        seq = processor.encode(f"words {IMAGE_PLACEHOLDER} more words", [make_image(56, 84)], f"s{i}")
        seq = apply_mlm(
            seq, mask_token_id=processor.mask_token_id, special_ids=processor.special_ids, rate=0.4, generator=g
        )
        sequences.append(apply_mae(seq, image_token_id=processor.image_token_id, rate=0.5, generator=g))
    batch = pack_sequences(sequences, processor.image_token_id)
    recorder = FusedLossInputs()
    with recorder:
        with bf16_autocast():
            hidden = model(batch)
            stage1 = mlm_loss(model, hidden, batch) + mae(hidden, batch, "sdpa")
            embeddings = model.embed(batch)  # fp32 pooled embeddings, as trainers/cl.py gives them
            stage2 = info_nce_loss(
                embeddings[:1],
                embeddings[1:2],
                embeddings[2:].reshape(1, 1, -1),
                torch.zeros(1, dtype=torch.long),
                normalize=False,
            )
        (stage1 + stage2).backward()
    return recorder.calls


def test_training_passes_bf16_operands_to_every_fused_loss(processor, make_image):
    calls = training_losses_under_autocast(processor, make_image)
    assert sorted(calls) == sorted(FUSED_LOSSES)
    for name, dtypes in calls.items():
        floating = {d for call in dtypes for d in call if d is not None and d.is_floating_point}
        # The patch targets stay as given (fp32 pixels); every matmul operand is bf16.
        operands = {d for call in dtypes for d in call[:2]}
        assert operands == {torch.bfloat16}, (name, dtypes)
        assert floating <= {torch.bfloat16, torch.float32}, (name, dtypes)


def _inputs(name: str):
    """fp32 inputs (matmul operands first) and the fused loss / its fp64 oracle on (operands, the rest)."""
    if name == "masked_lm_ce":
        operands = [torch.randn(37, 48) / 7, torch.randn(300, 48)]
        rest = [torch.randint(0, 300, (37,))]
        return operands, rest, masked_lm_cross_entropy, masked_lm_ce_reference
    if name == "patch_reconstruction":
        operands = [torch.randn(20, 48), torch.randn(150, 48) / 7, torch.randn(150)]
        rest = [torch.randn(20, 150)]
        return operands, rest, patch_reconstruction_loss, patch_reconstruction_reference
    operands = [torch.randn(12, 48), torch.randn(40, 48), torch.randn(12, 2, 48)]
    rest = [torch.randperm(40)[:12]]
    return operands, rest, info_nce_loss, info_nce_reference


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_fp32_inputs_under_bf16_autocast_accumulate_in_fp32(name, backend):
    device = device_for(backend)
    operands, rest, loss_fn, reference = _inputs(name)
    leaves = [x.clone().to(device).requires_grad_() for x in operands]
    recorder = FusedLossInputs()
    context = bf16_autocast() if device == "cpu" else torch.autocast("cuda", dtype=torch.bfloat16)
    with recorder, context:
        loss = loss_fn(*leaves, *[x.to(device) for x in rest], backend=backend)
    loss.backward()
    assert {call[i] for call in recorder.calls[name] for i in range(len(operands))} == {torch.bfloat16}
    rounded = [x.detach().to(torch.bfloat16).double().requires_grad_() for x in operands]
    expected = reference(*rounded, *rest)
    expected.backward()
    # fp32 accumulation over bf16-rounded operands: the fp64 loss of those operands to ~1e-6. (A bf16 matmul or
    # bf16 logits would be ~1e-3 away.)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), expected.detach().double(), rtol=2e-6, atol=1e-7)
    for leaf, ref in zip(leaves, rounded, strict=True):
        assert leaf.grad.dtype == torch.float32  # the master weights' dtype, through autocast's cast
        assert_matches(leaf.grad, ref.grad, 1.6e-2, "gradient")


@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_autocast_off_leaves_fp32_exact(name):
    operands, rest, loss_fn, reference = _inputs(name)
    with contextlib.nullcontext():
        loss = loss_fn(*operands, *rest, backend="torch")
    expected = reference(*[x.double() for x in operands], *rest)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-6, atol=1e-7)
