"""CPU's fast paths (what ``model.kernels=auto`` runs on a CPU tensor, ``chimera.models.ops.dispatch``) equal their
references (``model.kernels=reference``): the same math with the backward written out, checked by ``gradcheck`` in
fp64 (the SSD's in its fast mode: random directions through the Jacobian) and against the reference's autograd in fp32
(1e-5), with packed documents and lengths of one token.
"""

import math

import pytest
import torch

from chimera.models import conv
from chimera.models.ops import dispatch, ssd_cpu
from helpers import assert_close_all, grads

FP32 = dict(rtol=1e-5, atol=1e-5)


def graph_nodes(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``t`` was computed through."""
    seen, todo = {}, [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node.name()
            todo.extend(f for f, _ in node.next_functions)
    return set(seen.values())


@pytest.mark.parametrize("kernel,s,bias", [(4, 19, True), (1, 5, False), (3, 33, True), (4, 1, True)])
@pytest.mark.parametrize("packed", [False, True])
def test_short_conv_taps_equal_reference(kernel, s, bias, packed):
    """``conv.depthwise_taps`` (shifted multiply-adds) against torch's depthwise conv and the per-lag reference, in
    fp64 (gradcheck), fp32 and bf16 (computed in fp32, rounded once)."""
    gen = torch.Generator().manual_seed(kernel * 10 + s)
    x = torch.randn(s + kernel - 1, 2, 7, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(7, kernel, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    segments = torch.randint(0, 3, (s + kernel - 1, 2), generator=gen).sort(0).values if packed else None
    inputs = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradcheck(lambda *t: conv.depthwise_taps(*t[:2], t[2] if bias else None, segments), inputs)
    inputs = [t.detach().float().requires_grad_() for t in inputs]
    x, w, b = inputs[0], inputs[1], inputs[2] if bias else None
    got = dispatch.causal_conv1d(x, w, b, segments, kernels="auto")
    assert got.grad_fn.name().endswith("_TapSumsBackward")  # the taps, not the reference
    want = dispatch.causal_conv1d(x, w, b, segments, kernels="reference")
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)
    x16 = x.detach().bfloat16().requires_grad_()
    got16 = conv.depthwise_taps(x16, w, b, segments)
    assert got16.dtype == torch.bfloat16
    want32 = dispatch.causal_conv1d(x16.detach().float(), w, b, segments, kernels="reference")
    torch.testing.assert_close(got16.float(), want32, rtol=2e-2, atol=2e-2)
    (gx16,) = torch.autograd.grad(got16, x16, torch.ones_like(got16))
    assert gx16.dtype == torch.bfloat16


def test_long_filters_keep_torchs_conv():
    """Past ``conv.TAPS_MAX_KERNEL`` taps (Hyena's explicit filters) ``auto`` runs torch's conv, faster there."""
    k = conv.TAPS_MAX_KERNEL + 1
    x, w = torch.randn(k + 4, 2, 3, requires_grad=True), torch.randn(3, k, requires_grad=True)
    got = dispatch.causal_conv1d(x, w, None, kernels="auto")
    assert "_TapSumsBackward" not in graph_nodes(got)
    torch.testing.assert_close(got, conv.depthwise_taps(x, w, None), **FP32)


@pytest.mark.parametrize("q,packed", [(16, False), (16, True), (5, True), (1, False)])
def test_ssd_within_chunks_by_hand_equals_reference(q, packed):
    """``ssd_cpu.within_chunks`` with a group's ``C, B`` broadcast over its 3 heads, as ``ssd`` passes them,
    documents starting anywhere (``log a = -inf``) or nowhere (then the mask is the causal ``[q, q]`` alone)."""
    gen = torch.Generator().manual_seed(q + packed)
    C, B = (torch.randn(2, 2, 1, 3, q, 5, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    xdt = torch.randn(2, 2, 3, 3, q, 4, generator=gen, dtype=torch.float64).requires_grad_()
    log_a = -0.3 * torch.rand(2, 2, 3, 3, q, generator=gen, dtype=torch.float64)
    if packed:
        starts = torch.rand(2, 1, 1, 3, q, generator=gen) < 0.2  # per token: the same for every head
        log_a = log_a.masked_fill(starts, -math.inf)
    log_a.requires_grad_()
    inputs = (C, B, xdt, log_a)
    assert torch.autograd.gradcheck(ssd_cpu.within_chunks, inputs, fast_mode=True)
    inputs = [t.detach().float().requires_grad_() for t in inputs]
    got = dispatch.ssd_within_chunks(*inputs, kernels="auto")
    assert got.grad_fn.name().endswith("_WithinChunksBackward")
    want = dispatch.ssd_within_chunks(*inputs, kernels="reference")
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)


@pytest.mark.parametrize("s,h,groups,chunk,packed,skip,dt_scale", [
    (37, 4, 2, 8, True, True, 1.0),  # 5 chunks, the last partial
    (16, 2, 1, 16, False, False, 1.0),  # one whole chunk, no skip
    (20, 3, 3, 4, True, False, 1.0),  # a B, C per head
    (5, 1, 1, 8, False, True, 1.0),  # shorter than a chunk
    (32, 2, 1, 16, False, True, 60.0)])  # decays far below exp(EXP_FLOOR) within a chunk: set to 0
def test_ssd_by_hand_equals_reference(s, h, groups, chunk, packed, skip, dt_scale):
    """``ssd_cpu.ssd`` (the four steps and the skip ``D x`` with the backward by hand): gradcheck in fp64 of every
    input, and equal to ``mamba2.ssd`` with ``kernels=reference`` (the mixer's dispatch takes it on CPU at cp = 1) in
    fp32; resets where ``packed``, ``D`` where ``skip``, ``dt`` scaled by ``dt_scale``."""
    from chimera.models.mixers import mamba2

    gen = torch.Generator().manual_seed(s + h)
    b, p, n = 2, 3, 5
    x = torch.randn(s, b, h, p, generator=gen, dtype=torch.float64)
    dt = dt_scale * (0.05 + 0.5 * torch.rand(s, b, h, generator=gen, dtype=torch.float64))
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.2
    if dt_scale > 1:
        log_a = (dt * A).float()  # some chunk's decays reach below the floor, so the case tests the zeroing
        assert log_a.reshape(-1, chunk, b, h).sum(1).min() < ssd_cpu.EXP_FLOOR
    B, C = (torch.randn(s, b, groups, n, generator=gen, dtype=torch.float64) for _ in range(2))
    D = [torch.randn(h, generator=gen, dtype=torch.float64)] if skip else []
    reset = (torch.rand(s, b, generator=gen) < 0.15) if packed else None
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C, *D)]

    def with_skip(fn, *t, **kw):
        return fn(*t[:5], chunk, reset, D=t[5] if skip else None, **kw)

    assert torch.autograd.gradcheck(lambda *t: with_skip(ssd_cpu.ssd, *t), inputs, fast_mode=True)
    # in fp32; with strong decays in fp64, where the reference keeps the decays the fast path sets to 0 (the
    # gradients reach ~100 there, and both paths' fp32 rounding differs from the fp64 truth by ~2e-3)
    dtype, tol = (torch.float32, FP32) if dt_scale == 1 else (torch.float64, dict(rtol=1e-9, atol=1e-11))
    inputs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    got = with_skip(dispatch.ssd, *inputs, kernels="auto")
    assert "_ChunkedSSDBackward" in graph_nodes(got)  # the fast path, not the reference
    want = with_skip(mamba2.ssd, *inputs, kernels="reference")
    torch.testing.assert_close(got, want, **tol)
    assert_close_all(grads(got, inputs), grads(want, inputs), **tol)


@pytest.mark.parametrize("s,unnormalized,packed", [(19, False, True),  # documents starting anywhere
                                                   (23, True, True),  # RecurrentGemma's unscaled first tokens
                                                   (8, False, False),  # one document per row
                                                   (1, True, False)])  # one token
def test_rglru_by_hand_equals_reference(s, unnormalized, packed):
    """``rglru_cpu.states`` (the gates and the scan with the backward by hand): gradcheck in fp64 of the gates'
    pre-activations, the input and Lambda, and equal to ``rglru.states`` with ``kernels=reference`` in fp32."""
    from chimera.models.mixers import rglru
    from chimera.models.ops import rglru_cpu
    from chimera.parallel.dims import SINGLE_PROCESS

    gen = torch.Generator().manual_seed(s + unnormalized)
    gate_a, gate_x, u = (torch.randn(s, 3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    a_param = torch.randn(5, generator=gen, dtype=torch.float64)
    reset = torch.rand(s, 3, generator=gen) < (0.2 if packed else 0.0)
    reset[0] = True  # the sequence's first token, as the mixer marks it
    inputs = [t.requires_grad_() for t in (gate_a, gate_x, u, a_param)]
    assert torch.autograd.gradcheck(lambda *t: rglru_cpu.states(*t, reset, unnormalized), inputs)
    inputs = [t.detach().float().requires_grad_() for t in inputs]
    got = dispatch.rglru_states(*inputs, reset, unnormalized, kernels="auto")
    assert "_GatedRecurrenceBackward" in graph_nodes(got)
    want = rglru.states(*inputs, reset, unnormalized, SINGLE_PROCESS, kernels="reference")
    assert "_GatedRecurrenceBackward" not in graph_nodes(want)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)


def test_recurrent_block_takes_the_rglru_fast_path_and_matches_reference():
    """A Griffin recurrent block over packed documents with ``kernels=auto`` (the RG-LRU by hand, the taps) equals
    the same weights with ``kernels=reference``: outputs and every parameter's gradient, fp32."""
    from chimera.models.documents import PackedDocuments
    from chimera.models.mixers.rglru import RecurrentBlock
    from chimera.parallel.dims import SINGLE_PROCESS
    from chimera.parallel.sharding import initialize_parameters

    blocks = []
    for kernels in ("auto", "reference"):
        block = RecurrentBlock(8, 12, 3, 4, init_std=0.3, out_std=0.3, dims=SINGLE_PROCESS, bias=True,
                               reset_unnormalized=True, kernels=kernels)
        initialize_parameters(block, seed=0)
        blocks.append(block)
    seg = torch.tensor([[0] * 7 + [1] * 10, [0] * 3 + [1] * 2 + [2] * 12])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([7, 10], [3, 2, 12])])
    docs = PackedDocuments.from_batch(seg, pos)
    x = torch.randn(17, 2, 8, generator=torch.Generator().manual_seed(1))
    got, want = (block(x, docs) for block in blocks)
    assert "_GatedRecurrenceBackward" in graph_nodes(got)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, list(blocks[0].parameters())), grads(want, list(blocks[1].parameters())), **FP32)


@pytest.mark.parametrize("offset,groups,gated", [(False, 1, False), (True, 1, False), (False, 1, True),
                                                 (False, 3, True)])
def test_rms_norm_by_hand_equals_reference(offset, groups, gated):
    """``rmsnorm_cpu.rms_norm`` (plain, Gemma's ``1 + w``, gated by ``SiLU(z)`` in one or several groups): gradcheck
    in fp64, and equal in fp32 to the plain reference (``norms.rms_norm``) or, gated, to the same math by autograd;
    bf16 inputs computed in fp32 and rounded once."""
    import torch.nn.functional as F

    from chimera.models import norms
    from chimera.models.ops import rmsnorm_cpu

    gen = torch.Generator().manual_seed(groups + 2 * offset + 4 * gated)
    x, z = (torch.randn(5, 2, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(12, generator=gen, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in ((x, w, z) if gated else (x, w))]

    def fast(x, w, z=None):
        return rmsnorm_cpu.rms_norm(x, w, 1e-6, offset, gate=z, groups=groups)

    def reference(x, w, z=None):
        if not gated:
            return norms.rms_norm(x, w, 1e-6, offset)
        g = (x * F.silu(z)).unflatten(-1, (groups, -1))
        return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)).flatten(-2) * w

    assert torch.autograd.gradcheck(fast, inputs)
    inputs = [t.detach().float().requires_grad_() for t in inputs]
    got, want = fast(*inputs), reference(*inputs)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)
    x16 = inputs[0].detach().bfloat16().requires_grad_()
    got16 = fast(x16, *inputs[1:])
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), reference(x16.detach().float(), *inputs[1:]), rtol=1e-2, atol=1e-2)
    assert torch.autograd.grad(got16, x16, torch.ones_like(got16))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_mixer_fast_paths_equal_reference(n_groups):
    """A Mamba-2 mixer over packed documents with ``kernels=auto`` (the SSD, the taps and the gated norm by hand)
    equals the same weights with ``kernels=reference``: outputs and every parameter's gradient, fp32."""
    from chimera.models.documents import PackedDocuments
    from chimera.models.mixers.mamba2 import Mamba2Mixer
    from chimera.parallel.dims import SINGLE_PROCESS
    from chimera.parallel.sharding import initialize_parameters

    mixers = []
    for kernels in ("auto", "reference"):
        mixer = Mamba2Mixer(16, d_state=8, head_dim=8, n_groups=n_groups, chunk_size=8, init_std=0.2, out_std=0.2,
                            dims=SINGLE_PROCESS, kernels=kernels)
        initialize_parameters(mixer, seed=0)
        mixers.append(mixer)
    seg = torch.tensor([[0] * 9 + [1] * 12, [0] * 21])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([9, 12], [21])])
    docs = PackedDocuments.from_batch(seg, pos)
    x = torch.randn(21, 2, 16, generator=torch.Generator().manual_seed(1))
    got, want = (mixer(x, docs) for mixer in mixers)
    assert {"_RMSNormBackward", "_ChunkedSSDBackward"} <= graph_nodes(got)
    assert "_RMSNormBackward" not in graph_nodes(want)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, list(mixers[0].parameters())), grads(want, list(mixers[1].parameters())), **FP32)
