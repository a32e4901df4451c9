"""MaxSim (late-interaction) InfoNCE: loss and gradients of both backends against the fp64 oracle that materialises
every token similarity, over ragged token counts (1-token queries and documents included), hard negatives,
duplicate masking, autocast and bad inputs; the oracle itself against finite differences."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moca_fast.kernels import _common, maxsim_info_nce, maxsim_info_nce_reference
from moca_fast.kernels.reference import maxsim_scores_reference

from .conftest import CASES, assert_matches, device_for, rounded_pair

D = 24
TEMPERATURE = 0.05
# (query token counts, positive document token counts): ragged, with 1-token queries and documents; the 150-token
# document spans two 128-token tiles; 40-token query tiles straddle query boundaries.
QUERY_TOKENS = [3, 1, 7, 40, 2, 1]
POSITIVE_TOKENS = [1, 12, 150, 5, 1, 33, 9]


def _packed(lengths, generator):
    tokens = F.normalize(torch.randn(sum(lengths), D, generator=generator, dtype=torch.float64), dim=1)
    return tokens, torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _case(r: int, seed: int = 0):
    """(q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens, targets) in fp64: positives, then r negatives a query."""
    g = torch.Generator().manual_seed(seed)
    negative_tokens = torch.randint(1, 20, (len(QUERY_TOKENS) * r,), generator=g).tolist()
    q, q_cu = _packed(QUERY_TOKENS, g)
    d, d_cu = _packed(POSITIVE_TOKENS + negative_tokens, g)
    targets = torch.randperm(len(POSITIVE_TOKENS), generator=g)[: len(QUERY_TOKENS)]
    return q, q_cu, d, d_cu, targets


def _duplicates(targets, num_docs: int, seed: int = 1) -> torch.Tensor:
    """A mask of ~30% of the documents of each query, its target among them (which must stay in)."""
    mask = torch.rand(len(targets), num_docs, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask[torch.arange(len(targets)), targets] = True
    return mask


def one_minus_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _run(backend, dtype, r, duplicates: bool, seed: int = 0):
    """(loss, q grad, d grad) of ours on the dtype-rounded inputs, and the same of the fp64 oracle."""
    device = device_for(backend)
    q, q_cu, d, d_cu, targets = _case(r, seed)
    (q_low, q64), (d_low, d64) = rounded_pair(q, dtype, device), rounded_pair(d, dtype, device)
    mask = _duplicates(targets, d_cu.numel() - 1) if duplicates else None
    on = lambda x: None if x is None else x.to(device)
    loss = maxsim_info_nce(
        q_low,
        on(q_cu),
        d_low,
        on(d_cu),
        on(targets),
        temperature=TEMPERATURE,
        negatives=r or None,
        duplicate_mask=on(mask),
        backend=backend,
    )
    loss.backward()
    expected = maxsim_info_nce_reference(q64, q_cu, d64, d_cu, targets, TEMPERATURE, r or None, mask)
    expected.backward()
    return (loss, q_low.grad, d_low.grad), (expected, q64.grad, d64.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("r", [0, 2], ids=["no-negatives", "r2"])
@pytest.mark.parametrize("duplicates", [False, True], ids=["no-mask", "duplicate-mask"])
def test_fp32_is_exact_against_fp64(backend, r, duplicates, chunks):
    (loss, d_q, d_d), (expected, ref_q, ref_d) = _run(backend, torch.float32, r, duplicates)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() / expected.item() - 1) <= 1e-6
    assert d_q.dtype == d_d.dtype == torch.float32
    assert one_minus_cosine(d_q.cpu(), ref_q) <= 1e-9 and one_minus_cosine(d_d.cpu(), ref_d) <= 1e-9
    assert_matches(d_q, ref_q, 2e-5, "d_q_tokens")
    assert_matches(d_d, ref_d, 2e-5, "d_d_tokens")


@pytest.mark.parametrize("backend,dtype,tol", [c for c in CASES if c.values[1] != torch.float32])
def test_low_precision_matches_fp64_of_the_same_values(backend, dtype, tol):
    (loss, d_q, d_d), (expected, ref_q, ref_d) = _run(backend, dtype, r=2, duplicates=True)
    assert loss.dtype == torch.float32 and d_q.dtype == d_d.dtype == dtype
    assert_matches(loss, expected.double(), tol, "loss")
    assert_matches(d_q, ref_q, tol, "d_q_tokens")
    assert_matches(d_d, ref_d, tol, "d_d_tokens")


def test_the_oracle_matches_finite_differences():
    """The oracle's scores and their gradient (autograd through max: to the maximal document token) against central
    differences in fp64, over ragged 1- to 4-token queries and documents (the cross-entropy on top is torch's)."""
    g = torch.Generator().manual_seed(3)
    q, q_cu = _packed([2, 1, 4], g)
    d, d_cu = _packed([1, 3, 4, 2], g)
    q, d = q.requires_grad_(), d.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, d: maxsim_scores_reference(q, q_cu, d, d_cu), (q, d))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_query_sees_only_its_own_hard_negatives(backend):
    """Changing query 0's hard negatives changes the gradient of query 0's tokens only: every other query's
    softmax, and so its tokens' gradient, stays bit-equal."""
    device = device_for(backend)
    q, q_cu, d, d_cu, targets = (x.to(device) for x in _case(r=2))

    def query_grad(d):
        leaf = q.float().requires_grad_()
        maxsim_info_nce(
            leaf, q_cu, d.float(), d_cu, targets, temperature=TEMPERATURE, negatives=2, backend=backend
        ).backward()
        return leaf.grad

    changed = d.clone()
    changed[d_cu[len(POSITIVE_TOKENS)] : d_cu[len(POSITIVE_TOKENS) + 2]] *= -1.0  # query 0's two negatives
    before, after = query_grad(d), query_grad(changed)
    first_query = slice(0, QUERY_TOKENS[0])
    assert not torch.equal(before[first_query], after[first_query])
    assert torch.equal(before[QUERY_TOKENS[0] :], after[QUERY_TOKENS[0] :])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_duplicates_leave_the_denominator(backend):
    torch.manual_seed(0)
    (masked, _, _), _ = _run(backend, torch.float32, r=2, duplicates=True)
    (unmasked, _, _), _ = _run(backend, torch.float32, r=2, duplicates=False)
    assert masked < unmasked


class OpInputs(TorchDispatchMode):
    """The dtypes of the tensor arguments of every moca_fast::maxsim_info_nce call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("moca_fast::maxsim_info_nce") and "backward" not in func.name():
            self.calls.append(tuple(a.dtype for a in args if torch.is_tensor(a)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_inputs_under_bf16_autocast_reach_the_op_in_bf16_and_accumulate_in_fp32(backend):
    device = device_for(backend)
    q, q_cu, d, d_cu, targets = (x.to(device) for x in _case(r=2))
    q, d = q.float().requires_grad_(), d.float().requires_grad_()
    recorder = OpInputs()
    with recorder, torch.autocast(device, dtype=torch.bfloat16):
        loss = maxsim_info_nce(q, q_cu, d, d_cu, targets, temperature=TEMPERATURE, negatives=2, backend=backend)
    loss.backward()
    assert [call[0:3:2] for call in recorder.calls] == [(torch.bfloat16, torch.bfloat16)]
    assert q.grad.dtype == d.grad.dtype == torch.float32
    q16, d16 = (x.detach().cpu().bfloat16().double() for x in (q, d))
    expected = maxsim_info_nce_reference(q16, q_cu.cpu(), d16, d_cu.cpu(), targets.cpu(), TEMPERATURE, 2)
    # fp32 accumulation over bf16-rounded operands: the fp64 loss of those operands to ~1e-6 (a bf16 dot output
    # would be ~1e-3 away).
    torch.testing.assert_close(loss.double().cpu(), expected.double(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_rank_losses_sum_to_the_global_gradient(backend):
    """Two ranks' queries against the same gathered documents: the documents' gradients, summed over ranks (what
    the gather with gradient's all-reduce does), equal the gradient of the loss over all queries."""
    device = device_for(backend)
    q, q_cu, d, d_cu, targets = (x.to(device) for x in _case(r=0))
    q, d = q.float(), d.float()
    whole = d.clone().requires_grad_()
    maxsim_info_nce(q, q_cu, whole, d_cu, targets, temperature=TEMPERATURE, backend=backend).backward()
    summed = torch.zeros_like(d)
    half = (q_cu.numel() - 1) // 2
    for first, end in ((0, half), (half, q_cu.numel() - 1)):
        rank_docs = d.clone().requires_grad_()
        rows = slice(int(q_cu[first]), int(q_cu[end]))
        loss = maxsim_info_nce(
            q[rows],
            q_cu[first : end + 1] - q_cu[first],
            rank_docs,
            d_cu,
            targets[first:end],
            temperature=TEMPERATURE,
            backend=backend,
        )
        (loss * (end - first) / (q_cu.numel() - 1)).backward()  # each rank's mean, weighted back to the global one
        summed += rank_docs.grad
    torch.testing.assert_close(summed, whole.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_queries_gives_zero_loss_and_zero_gradients(backend):
    device = device_for(backend)
    _, _, d, d_cu, _ = _case(r=0)
    d = d.float().to(device).requires_grad_()
    q = torch.zeros(0, D, device=device, requires_grad=True)
    loss = maxsim_info_nce(
        q,
        torch.zeros(1, dtype=torch.int32, device=device),
        d,
        d_cu.to(device),
        torch.zeros(0, dtype=torch.long, device=device),
        temperature=TEMPERATURE,
        backend=backend,
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(d.grad, torch.zeros_like(d))


def test_bad_inputs_are_one_line_errors_naming_the_sample():
    q, q_cu, d, d_cu, targets = (x.float() if x.is_floating_point() else x for x in _case(r=0))
    call = lambda **kw: maxsim_info_nce(
        **(
            {
                "q_tokens": q,
                "q_cu_seqlens": q_cu,
                "d_tokens": d,
                "d_cu_seqlens": d_cu,
                "targets": targets,
                "temperature": 0.05,
            }
            | kw
        )
    )
    empty = q_cu.clone()
    empty[2] = empty[1]
    with pytest.raises(ValueError, match="^query 1 has no tokens"):
        call(q_cu_seqlens=empty)
    with pytest.raises(ValueError, match="d_cu_seqlens must run from 0 to"):
        call(d_cu_seqlens=d_cu[:-1])
    wrong = targets.clone()
    wrong[3] = len(POSITIVE_TOKENS)
    with pytest.raises(ValueError, match="^query 3: target 7 is not one of the 7 positive documents"):
        call(targets=wrong)
    with pytest.raises(ValueError, match="targets must be"):
        call(targets=targets[:-1])
    with pytest.raises(ValueError, match="negatives=9 per query"):
        call(negatives=9)
    with pytest.raises(ValueError, match="duplicate_mask must be a bool"):
        call(duplicate_mask=torch.zeros(len(QUERY_TOKENS), 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="share a dtype"):
        call(d_tokens=d.double())


@pytest.mark.slow
def test_torch_path_memory_stays_within_its_chunk_budget():
    """Peak CPU memory beyond inputs and gradients, measured in a fresh process (bench/maxsim_memory.py): 2,048
    query tokens against 131,072 document tokens, whose similarity matrix alone is 1 GiB in fp32, stay within
    three chunk budgets (384 MiB: one similarity band, its reductions and the process's own ~80 MiB of library
    pages). At the issue's goal shape the same bands give bench/results/maxsim-memory-cpu.json."""
    from bench import maxsim_memory

    Q, Lq, N, Ld = 64, 32, 512, 256
    row = maxsim_memory.measure("moca_fast", (Q, Lq, N, Ld, 128), "step", time_box_s=600)
    assert row["status"] == "ok", row
    similarity = Q * Lq * N * Ld * 4
    assert row["beyond_inputs_and_grads_bytes"] <= 3 * _common.CHUNK_ELEMENTS * 4 < similarity, row
