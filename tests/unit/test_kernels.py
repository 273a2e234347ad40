"""The Triton kernels of ``chimera.models.ops`` equal their reference (``model.kernels=reference``): forward outputs and
input / parameter gradients, with document resets and lengths that the kernels' tiles do not divide.

No GPU here: the kernels run in Triton's interpreter, which ``TRITON_INTERPRET=1`` turns on. It must be set before
``triton`` is first imported (DeepSpeed imports it, so a worker that ran a DeepSpeed test first has it), so
``tests/conftest.py`` sets it for the whole session. Sizes are tiny: the interpreter runs each program in numpy.

Tolerances: fp32 1e-5 (the kernels accumulate in fp32, in a different order than the reference); bf16 inputs: the
kernels compute in fp32 and round once, so they are held to the fp32 reference on the same bf16 inputs within
bf16's rounding, 2e-2 relative.
"""

import math

import pytest
import torch

from chimera.errors import UserError
from chimera.models import conv, scan
from chimera.models.ops import dispatch
from helpers import assert_close_all, build_model, grads

pytest.importorskip("triton")

FP32 = dict(rtol=1e-5, atol=1e-5)


def decays_with_resets(shape, gen):
    """Decays in (0, 1) with ``a_t = 0`` at a few positions: documents' first tokens, as the mixers mark them."""
    a = torch.rand(shape, generator=gen) * 0.5 + 0.5
    resets = torch.rand(shape[:2], generator=gen) < 0.15
    return a.masked_fill(resets.reshape(*shape[:2], *([1] * (len(shape) - 2))), 0.0)


# ---- the diagonal linear scan -------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 16, 37])  # one step, exactly one tile (CHUNK = 16), not a multiple of it
def test_scan_kernel_equals_reference_forward_and_backward(T):
    gen = torch.Generator().manual_seed(T)
    a = decays_with_resets((T, 2, 3, 5), gen).requires_grad_()
    b = torch.randn(T, 2, 3, 5, generator=gen).requires_grad_()
    h0 = torch.randn(2, 3, 5, generator=gen).requires_grad_()
    for start in (None, h0):
        got = dispatch.linear_scan(a, b, start, kernels="triton")
        want = dispatch.linear_scan(a, b, start, kernels="reference")
        torch.testing.assert_close(got, want, **FP32)
        inputs = (a, b) if start is None else (a, b, h0)
        assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)


@pytest.mark.parametrize("s,heads,p,n,chunk", [(37, 1, 40, 5, 16),  # 3 saved chunks (the last partial), 2 programs
                                             (20, 3, 8, 4, 8)])  # heads: a program's channels within one head
def test_selective_scan_kernel_equals_reference(s, heads, p, n, chunk):
    """Mamba-1's discretisation, scan and read-out fused, against the materialised reference: ``y``, the last state
    and the gradients of ``Delta, x, A, B, C`` (through both outputs), with documents starting mid-sequence."""
    from chimera.models.mixers import mamba
    from chimera.models.ops import selective_scan

    gen = torch.Generator().manual_seed(s + heads)
    dt = (0.05 + 0.5 * torch.rand(s, 2, heads, p, generator=gen)).requires_grad_()
    x = torch.randn(s, 2, heads, p, generator=gen).requires_grad_()
    A = (-torch.rand(heads, p, n, generator=gen) * 2 - 0.1).requires_grad_()
    B, C = (torch.randn(s, 2, heads, n, generator=gen).requires_grad_() for _ in range(2))
    reset = torch.rand(s, 2, generator=gen) < 0.1
    reset[0] = True
    inputs = (dt, x, A, B, C)
    got = selective_scan.selective_scan(*inputs, reset, chunk=chunk)
    want = mamba.selective_scan(*inputs, reset)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **FP32)
    g = [torch.randn(t.shape, generator=gen) for t in want]
    assert_close_all(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), **FP32)


def test_scan_kernel_broadcast_decay_matches_the_step_by_step_recurrence():
    """A decay shared by channels (size 1 there, as Based's): its gradient summed back over them."""
    gen = torch.Generator().manual_seed(1)
    a = decays_with_resets((21, 2, 1), gen).requires_grad_()
    b = torch.randn(21, 2, 150, generator=gen).requires_grad_()  # 300 channels: a whole program and a partial one
    got = dispatch.linear_scan(a, b, kernels="triton")
    want = scan.linear_recurrence_loop(a, b)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, (a, b)), grads(want, (a, b)), **FP32)


def test_complex_scan_kernel_equals_the_reference_s5_runs():
    gen = torch.Generator().manual_seed(2)
    magnitude = decays_with_resets((19, 2, 6), gen)
    a = torch.polar(magnitude, torch.randn(19, 2, 6, generator=gen)).requires_grad_()
    b = torch.complex(torch.randn(19, 2, 6, generator=gen), torch.randn(19, 2, 6, generator=gen)).requires_grad_()
    got = dispatch.linear_scan(a, b, kernels="triton")
    want = scan.HillisSteele.states(a, b)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, (a, b)), grads(want, (a, b)), **FP32)


def test_scan_kernel_bf16_within_bf16_rounding_of_the_fp32_reference():
    gen = torch.Generator().manual_seed(3)
    a = decays_with_resets((37, 2, 40), gen).bfloat16().requires_grad_()
    b = torch.randn(37, 2, 40, generator=gen).bfloat16().requires_grad_()
    got = dispatch.linear_scan(a, b, kernels="triton")
    assert got.dtype == torch.bfloat16
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    want = scan.linear_scan(a32, b32)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    g = torch.randn(got.shape, generator=gen)
    got_grads = torch.autograd.grad(got, (a, b), g.bfloat16())
    want_grads = torch.autograd.grad(want, (a32, b32), g)
    assert_close_all([x.float() for x in got_grads], want_grads, rtol=2e-2, atol=5e-2)


# ---- the causal depthwise short conv ------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,s,bias", [(4, 19, True), (1, 5, False), (3, 33, True)])
@pytest.mark.parametrize("packed", [False, True])
def test_short_conv_kernel_equals_reference(kernel, s, bias, packed):
    gen = torch.Generator().manual_seed(kernel * 100 + s)
    x = torch.randn(s + kernel - 1, 2, 150, generator=gen).requires_grad_()  # 150 channels: a whole tile, a partial one
    w = torch.randn(150, kernel, generator=gen).requires_grad_()
    b = torch.randn(150, generator=gen).requires_grad_() if bias else None
    segments = torch.randint(0, 3, (s + kernel - 1, 2), generator=gen).sort(0).values if packed else None
    got = dispatch.causal_conv1d(x, w, b, segments, kernels="triton")
    want = (conv.depthwise_valid(x, w, b) if segments is None
            else conv.depthwise_valid_within_segments(x, w, b, segments))
    torch.testing.assert_close(got, want, **FP32)
    inputs = (x, w) if b is None else (x, w, b)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)


# ---- Hyena's gate and skip after the long convolution --------------------------------------------------------------

@pytest.mark.parametrize("s,c", [(37, 70), (1, 5)])  # rows and channels not multiples of the 32 x 64 tiles
def test_hyena_gate_with_skip_kernel_equals_reference(s, c):
    """``g (y + D z)``, forward and the gradients of all four (``D``'s summed over every row); the gate a strided view
    of a wider tensor, as Hyena's streams are."""
    from chimera.models.mixers import hyena

    gen = torch.Generator().manual_seed(s)
    wide = torch.randn(s, 2, 2 * c, generator=gen).requires_grad_()
    y, z = (torch.randn(s, 2, c, generator=gen).requires_grad_() for _ in range(2))
    D = torch.randn(c, generator=gen).requires_grad_()
    g = wide[..., ::2]
    got = dispatch.hyena_gate_with_skip(g, y, z, D, kernels="triton")
    want = hyena.gate_with_skip(g, y, z, D)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, (wide, y, z, D)), grads(want, (wide, y, z, D)), **FP32)


# ---- RMSNorm ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,d,offset", [(37, 70, False), (1, 64, True), (40, 5, True)])  # ROWS = 16, odd widths
def test_rms_norm_kernel_equals_reference(rows, d, offset):
    from chimera.models import norms

    gen = torch.Generator().manual_seed(rows + d)
    x = (3 * torch.randn(rows, d, generator=gen)).requires_grad_()
    w = torch.randn(d, generator=gen).requires_grad_()
    got = dispatch.rms_norm(x, w, 1e-5, offset, kernels="triton")
    want = norms.rms_norm(x, w, 1e-5, offset)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, (x, w)), grads(want, (x, w)), **FP32)


def test_rms_norm_kernel_bf16_within_bf16_rounding_of_the_fp32_reference():
    """bf16 in and out, fp32 inside: the fp32 reference on the same bf16 inputs, within bf16's rounding."""
    from chimera.models import norms

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(19, 3, 48, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(48, generator=gen).bfloat16().requires_grad_()
    got = dispatch.rms_norm(x, w, 1e-6, kernels="triton")
    assert got.dtype == torch.bfloat16
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    want = norms.rms_norm(x32, w32, 1e-6)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    g = torch.randn(want.shape, generator=gen)
    assert_close_all([t.float() for t in torch.autograd.grad(got, (x, w), g.bfloat16())],
                     torch.autograd.grad(want, (x32, w32), g), rtol=2e-2, atol=5e-2)


# ---- RoPE -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s,d,rot,per_row", [(37, 16, 16, False), (5, 20, 12, True), (1, 8, 2, True)])
def test_rope_kernel_equals_reference(s, d, rot, per_row):
    """Rows not a multiple of the kernel's 16, a partial rotation (``rope_fraction < 1``: dims passed through), tables
    shared by the batch or per row (packed documents); ``x`` a permuted view, as attention's heads are."""
    from chimera.models.mixers.attention import Rope, apply_rope

    gen = torch.Generator().manual_seed(s + d)
    wide = torch.randn(s, 2, 3 * d, generator=gen).requires_grad_()  # [s, b, heads * d]
    x = wide.unflatten(-1, (3, d)).permute(1, 2, 0, 3)  # [b, h, s, d]
    positions = (torch.randint(0, 50, (2, 1, s), generator=gen) if per_row else torch.arange(s) + 3)
    cos, sin = Rope(rot, 10000.0).tables(positions)
    got = dispatch.apply_rope(x, cos, sin, kernels="triton")
    want = apply_rope(x, cos, sin)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, (wide,)), grads(want, (wide,)), **FP32)


def test_rope_kernel_bf16_within_bf16_rounding_of_the_fp32_reference():
    """bf16 in and out, fp32 tables and arithmetic: the fp32 reference on the same bf16 inputs, within a rounding."""
    from chimera.models.mixers.attention import Rope, apply_rope

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 19, 32, generator=gen).bfloat16().requires_grad_()
    cos, sin = Rope(32, 10000.0).tables(torch.arange(19))
    got = dispatch.apply_rope(x, cos, sin, kernels="triton")
    assert got.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    want = apply_rope(x32, cos, sin)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)  # bf16's 8 bits: one rounding, |y| <~ 4
    g = torch.randn(want.shape, generator=gen)
    (dx,), (dx32,) = torch.autograd.grad(got, x, g.bfloat16()), torch.autograd.grad(want, x32, g)
    torch.testing.assert_close(dx.float(), dx32, rtol=1e-2, atol=1e-2)


# ---- Mamba-2's SSD within chunks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("q,n,p,block", [(16, 16, 16, 32), (8, 5, 3, 32),  # one block; dims below 16: masked
                                         (40, 5, 3, 16), (37, 20, 17, 16)])  # a chunk of 3 blocks, the last partial
def test_ssd_within_chunks_kernel_equals_reference(q, n, p, block):
    """Chunks cut into blocks of ``block`` positions (a block's causal loop over the ones before it, in the forward
    and both backward kernels), documents starting anywhere."""
    from chimera.models.mixers import mamba2
    from chimera.models.ops import ssd

    gen = torch.Generator().manual_seed(q + n + p)
    C, B = (torch.randn(2, 3, 2, q, n, generator=gen).requires_grad_() for _ in range(2))
    xdt = torch.randn(2, 3, 2, q, p, generator=gen).requires_grad_()
    starts = torch.rand(2, 3, 2, q, generator=gen) < 0.15  # documents' first tokens: log a = -inf
    log_a = (-0.3 * torch.rand(2, 3, 2, q, generator=gen)).masked_fill(starts, -math.inf).requires_grad_()
    got = ssd.within_chunks(C, B, xdt, log_a, block=block)
    inputs = (C, B, xdt, log_a)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    want = mamba2.within_chunks(*inputs64)
    # against fp64, each tensor within 1e-5 of its largest entry: log a's gradient adds up terms as large as that
    # (the reference's own fp32 rounding is as large at these sizes)
    g = torch.randn(got.shape, generator=gen)
    got_all = [got, *torch.autograd.grad(got, inputs, g)]
    for i, (x, y) in enumerate(zip(got_all, [want, *torch.autograd.grad(want, inputs64, g.double())], strict=True)):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5 * y.abs().max().item(),
                                   msg=lambda m, i=i: f"output {i}: {m}")


def test_ssd_with_kernels_equals_reference_across_chunks_and_odd_length():
    """The whole chunked scan (kernel within chunks, torch between them) on 37 tokens in chunks of 16, with resets."""
    from chimera.models.mixers import mamba2

    gen = torch.Generator().manual_seed(5)
    s, b, h, p, n = 37, 2, 3, 4, 8
    x = torch.randn(s, b, h, p, generator=gen).requires_grad_()
    dt = (0.05 + 0.1 * torch.rand(s, b, h, generator=gen)).requires_grad_()
    A = -torch.arange(1.0, h + 1).requires_grad_()
    B, C = (torch.randn(s, b, h, n, generator=gen).requires_grad_() for _ in range(2))
    reset = torch.rand(s, b, generator=gen) < 0.1
    reset[0] = True
    got = mamba2.ssd(x, dt, A, B, C, 16, reset, kernels="triton")
    want = mamba2.ssd(x, dt, A, B, C, 16, reset, kernels="reference")
    torch.testing.assert_close(got, want, **FP32)
    inputs = (x, dt, A, B, C)
    assert_close_all(grads(got, inputs), grads(want, inputs), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("q_len,f,e", [(16, 16, 17), (8, 5, 3)])  # e: the values with their ones; below 16: masked
@pytest.mark.parametrize("packed", [False, True])
def test_based_within_chunks_kernel_equals_reference(q_len, f, e, packed):
    from chimera.models.mixers import based

    gen = torch.Generator().manual_seed(q_len + f + e)
    q, k = (torch.randn(2, 3, 2, q_len, f, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, 2, q_len, e, generator=gen).requires_grad_()
    # each position's document index in its chunk, shared by the heads (as based_chunked passes it)
    document = (torch.rand(2, 1, 2, q_len, generator=gen) < 0.2).long().cumsum(-1) if packed else None
    got = dispatch.based_within_chunks(q, k, v, document, kernels="triton")
    want = based.within_chunks(q, k, v, document)
    torch.testing.assert_close(got, want, **FP32)
    inputs = (q, k, v)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)


def test_based_with_kernels_equals_the_recurrent_form_across_chunks_and_odd_length():
    """The whole chunked form (kernel within chunks, torch between them) on 37 tokens in chunks of 16, with resets,
    against the recurrent form (step-by-step state) in fp64 and the reference chunked form."""
    from chimera.models.mixers import based

    gen = torch.Generator().manual_seed(7)
    s, b, h, f, p = 37, 2, 3, 4, 5
    q, k = (torch.randn(s, b, h, f, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(s, b, h, p, generator=gen).requires_grad_()
    reset = torch.rand(s, b, generator=gen) < 0.1
    reset[0] = True
    got = based.based_chunked(q, k, v, 16, reset, kernels="triton")
    want = based.based_chunked(q, k, v, 16, reset, kernels="reference")
    recurrent = based.based_recurrent(q.double(), k.double(), v.double(), reset)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(got.double(), recurrent, **FP32)
    inputs = (q, k, v)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)


# ---- RWKV-6's WKV ---------------------------------------------------------------------------------------------------

def wkv_chunk_inputs(shape, m, gen):
    """``r, k, v`` and the log decays before / up to each position (cumulative sums of ``log w < 0``, as ``wkv``
    makes them), all requiring gradients; ``shape``: ``[..., q, n]``."""
    r, k = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(*shape[:-1], m, generator=gen).requires_grad_()
    log_w = -torch.exp(torch.randn(shape, generator=gen) - 1.0)
    cum = log_w.cumsum(-2).requires_grad_()
    before = (cum.detach() - log_w).requires_grad_()
    return r, k, v, before, cum


@pytest.mark.parametrize("q_len,n,m", [(16, 16, 16), (8, 5, 3)])  # below 16: masked
@pytest.mark.parametrize("packed", [False, True])
def test_rwkv6_within_chunks_kernel_equals_reference(q_len, n, m, packed):
    from chimera.models.mixers import rwkv6

    gen = torch.Generator().manual_seed(q_len + n + m)
    inputs = wkv_chunk_inputs((2, 3, 2, q_len, n), m, gen)
    # each position's document index in its chunk, shared by the heads (as wkv passes it)
    document = (torch.rand(2, 1, 2, q_len, generator=gen) < 0.2).long().cumsum(-1) if packed else None
    got = dispatch.rwkv6_within_chunks(*inputs, document, kernels="triton")
    want = rwkv6.within_chunks(*inputs, document)
    torch.testing.assert_close(got, want, **FP32)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)


def test_rwkv6_wkv_with_kernels_equals_the_recurrence_across_chunks_and_odd_length():
    """The whole chunked WKV (kernel within chunks and for the scan between them, torch for the rest) on 37 tokens
    in chunks of 16, with resets, against the recurrence one token at a time in fp64 and the reference chunks."""
    from chimera.models.mixers import rwkv6

    gen = torch.Generator().manual_seed(11)
    s, b, h, n = 37, 2, 3, 4
    r, k, v = (torch.randn(s, b, h, n, generator=gen).requires_grad_() for _ in range(3))
    log_w = (-torch.exp(torch.randn(s, b, h, n, generator=gen) - 1.0)).requires_grad_()
    u = torch.randn(h, n, generator=gen).requires_grad_()
    reset = torch.rand(s, b, generator=gen) < 0.1
    reset[0] = True
    inputs = (r, k, v, log_w, u)
    got = rwkv6.wkv(*inputs, 16, reset, kernels="triton")
    want = rwkv6.wkv(*inputs, 16, reset, kernels="reference")
    state = torch.zeros(b, h, n, n, dtype=torch.float64)
    recurrence = []
    for t in range(s):
        state = state * ~reset[t, :, None, None, None]
        o, state = rwkv6.wkv_step(*(x[t].double() for x in (r, k, v)), log_w[t].double().exp(), u.double(), state)
        recurrence.append(o)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(got.double(), torch.stack(recurrence), **FP32)
    assert_close_all(grads(got, inputs), grads(want, inputs), **FP32)


# ---- through the mixers: a whole model with kernels=triton equals kernels=reference --------------------------------

SMALLER = {"mamba-tiny": ["num_layers=2", "ssm_state=4"], "gryphon-tiny": ["num_layers=4"],
           "griffin-tiny": ["pattern=RL-", "num_layers=3"], "mamba2-tiny": ["num_layers=2"],
           "based-tiny": ["num_layers=4"], "goldfinch-tiny": ["pattern=WCGC"],
           "hyena-tiny": ["num_layers=2"], "striped-hyena2-tiny": []}  # the interpreter: slow


def loss_and_grads(preset, kernels, seq=23):
    """A tiny preset's loss on two packed sequences (documents reset the states) and its parameter gradients."""
    model = build_model(preset, seed=0, overrides=[f"kernels={kernels}", *SMALLER[preset]])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, seq), generator=gen)
    segment_ids = torch.tensor([[0] * 9 + [1] * (seq - 9), [0] * 4 + [1] * 11 + [2] * (seq - 15)])
    position_ids = torch.cat([torch.arange(9), torch.arange(seq - 9)]), torch.cat(
        [torch.arange(4), torch.arange(11), torch.arange(seq - 15)])
    loss = model(ids, labels=ids, segment_ids=segment_ids, position_ids=torch.stack(position_ids))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["griffin-tiny", "mamba-tiny", "gryphon-tiny", "mamba2-tiny", "based-tiny",
                                    "goldfinch-tiny", "hyena-tiny", "striped-hyena2-tiny"])
def test_model_with_triton_kernels_equals_reference(preset):
    """RG-LRU + conv and local attention's RoPE (Griffin), Mamba-1's selective scan + conv, S5's complex scan (Gryphon),
    Mamba-2's SSD + convs, Based's linear attention + BaseConv's conv, RWKV-6's WKV (GoldFinch's Finch blocks), Hyena's
    short convs and gate (implicit filter), StripedHyena 2's FIRs (X, D: the short-conv kernel) and modal Hyena; every
    RMSNorm of them (the GoldFinch's LayerNorms excepted); an odd length (23) and packed documents."""
    loss, grad = loss_and_grads(preset, "triton")
    loss_ref, grad_ref = loss_and_grads(preset, "reference")
    torch.testing.assert_close(loss, loss_ref, **FP32)
    assert grad.keys() == grad_ref.keys()
    for name in grad:  # each within 1e-5 of its largest entry: at init many are ~1e-10 (Mamba's dt, A), below any
        # fixed atol
        scale = grad_ref[name].abs().max().item()
        torch.testing.assert_close(grad[name], grad_ref[name], rtol=1e-4, atol=1e-5 * scale + 1e-30,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---- choosing ---------------------------------------------------------------------------------------------------

def test_auto_runs_the_reference_on_cpu_and_triton_needs_cuda_or_the_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    assert not dispatch.use_triton("auto", cpu)
    assert not dispatch.use_triton("reference", cpu)
    assert dispatch.use_triton("triton", cpu)  # TRITON_INTERPRET=1 here
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert dispatch.use_triton("auto", cuda)  # a kernel checked on a GPU
    assert not dispatch.use_triton("auto", cuda, checked_on_gpu=False)  # one held to its reference only here
    assert dispatch.use_triton("triton", cuda, checked_on_gpu=False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UserError, match="model.kernels=triton needs a CUDA device"):
        dispatch.use_triton("triton", cpu)
