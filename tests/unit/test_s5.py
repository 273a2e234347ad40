"""S5 (arXiv 2208.04933): the parallel scan equals the recurrence, decoding equals the forward pass, causality,
HiPPO-N's eigenvalues, zero-order hold against the matrix exponential, and s5-pytorch 0.2.1 on the same weights."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from chimera.models.config import ModelConfig
from chimera.models.mixers import s5 as s5_mixer
from chimera.models.spec import Build
from chimera.models.sublayer import build_mixer
from chimera.parallel.dims import ParallelDims
from chimera.parallel.sharding import initialize_parameters
from helpers import assert_causal


def make_layer(seed=0, **fields):
    cfg = ModelConfig(pattern="S", vocab_size=64, d_model=fields.pop("d_model", 16),
                      **{"s5_state": 8, **fields})
    layer = build_mixer("S", cfg, Build.of(cfg, ParallelDims()))
    initialize_parameters(layer, seed)
    return layer.double(), cfg


def x_seq(s=30, b=2, d=16, seed=1):
    return torch.randn(s, b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("conj_sym", [True, False])
def test_parallel_scan_equals_the_recurrence(conj_sym):
    """Eq. 2-3 one token at a time, in plain code, against the associative scan (fp64)."""
    layer, _ = make_layer(s5_conj_sym=conj_sym)
    ssm = layer.ssm
    u = x_seq()
    Lambda_bar, B_bar = (torch.view_as_complex(t) for t in ssm.discretized(torch.float64))
    C = torch.complex(ssm.C[..., 0], ssm.C[..., 1])
    x = torch.zeros(2, Lambda_bar.shape[0], dtype=torch.complex128)
    expected = []
    for t in range(u.shape[0]):
        x = Lambda_bar * x + u[t].to(torch.complex128) @ B_bar.T
        expected.append((2.0 if conj_sym else 1.0) * (x @ C.T).real + ssm.D * u[t])
    torch.testing.assert_close(ssm(u), torch.stack(expected), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("conj_sym", [True, False])
def test_conjugate_halving_gives_the_full_pair_set(conj_sym):
    """Storing one state of each conjugate pair and reading out 2 Re(C x) is the full system of P states."""
    half, _ = make_layer(seed=3)
    full, _ = make_layer(seed=3, s5_conj_sym=False)
    with torch.no_grad():  # the full system from the halved one: every state with its conjugate
        for name in ("lambda_re", "log_step"):
            getattr(full.ssm, name).copy_(torch.cat([getattr(half.ssm, name)] * 2))
        full.ssm.lambda_im.copy_(torch.cat([half.ssm.lambda_im, -half.ssm.lambda_im]))
        full.ssm.B.copy_(torch.cat([half.ssm.B, half.ssm.B * torch.tensor([1.0, -1.0], dtype=torch.float64)]))
        full.ssm.C.copy_(torch.cat([half.ssm.C, half.ssm.C * torch.tensor([1.0, -1.0], dtype=torch.float64)], 1))
        full.ssm.D.copy_(half.ssm.D)
    u = x_seq()
    torch.testing.assert_close(half(u), full(u), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conj_sym", [True, False])
def test_decoding_steps_equal_the_forward_pass(conj_sym):
    layer, _ = make_layer(s5_conj_sym=conj_sym)
    x = x_seq()
    state = layer.init_state(2, 30)
    steps = torch.cat([layer.step(x[t:t + 1], state, t) for t in range(30)])
    torch.testing.assert_close(steps, layer(x), rtol=1e-9, atol=1e-9)


def test_the_scan_on_real_pairs_equals_the_complex_scan():
    """The scan an exported graph runs (complex pairs, chimera.models.complex_pairs.mul) against the one training
    runs in torch complex arithmetic, with a document reset inside."""
    layer, _ = make_layer()
    u = x_seq(s=21)
    reset = torch.zeros(21, 2, dtype=torch.bool)
    reset[9, 1] = True
    trained = layer.ssm.states(u, reset)
    Lambda_bar, B_bar = layer.ssm.discretized(torch.float64)
    a = torch.where(reset[..., None, None], 0.0, Lambda_bar).expand(21, 2, -1, -1)
    a = torch.cat([torch.zeros_like(a[:1]), a[1:]])
    pairs = s5_mixer.associative_scan(a, layer.ssm.inputs(u, B_bar))
    torch.testing.assert_close(pairs, trained, rtol=1e-12, atol=1e-12)
    assert trained.shape == (21, 2, 4, 2) and not trained.is_complex()


def test_causal():
    layer, _ = make_layer()
    assert_causal(layer, x_seq())


def test_hippo_n_eigenvalues_are_those_of_the_closed_form():
    """HiPPO-LegS built entry by entry from its definition, made normal by + p p^T; its eigenvalues (a general,
    non-Hermitian solver) are the conjugate pairs the layer starts from; real parts exactly -1/2."""
    P = 16
    legs = np.zeros((P, P))
    for n in range(P):
        for k in range(P):
            legs[n, k] = -math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else (-(n + 1) if n == k else 0.0)
    p = np.sqrt(np.arange(P) + 0.5)
    normal = legs + np.outer(p, p)
    eigenvalues = np.linalg.eigvals(normal)
    expected = eigenvalues[np.argsort(eigenvalues.imag)]  # by imaginary part: the real parts are all -1/2
    Lambda, V = s5_mixer.hippo_n_eigen(P)  # the eigendecomposition the layer is initialised with (fp64)
    half = Lambda[: P // 2].numpy()
    assert np.all(half.imag < 0)  # one of each conjugate pair: the other has the opposite imaginary part
    both = np.concatenate([half, half.conj()])
    got = both[np.argsort(both.imag)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(half.real, -0.5)
    np.testing.assert_allclose((V @ torch.diag(Lambda) @ V.conj().T).numpy(), normal, atol=1e-10)
    layer, _ = make_layer(s5_state=P, d_model=8)  # its parameters: those P / 2 eigenvalues (stored in fp32)
    stored = torch.complex(layer.ssm.lambda_re, layer.ssm.lambda_im).detach().numpy()
    np.testing.assert_allclose(stored, half, rtol=1e-7, atol=0)


def test_zero_order_hold_equals_the_matrix_exponential():
    """ZOH of the continuous system: [[A D, D B], [0, 0]] exponentiated holds (Lambda_bar, B_bar) (van Loan), per
    state step D; and in the original basis, with one step, V Lambda_bar V^H = expm(A_N D)."""
    layer, _ = make_layer(s5_state=6, d_model=3, s5_conj_sym=False)
    ssm = layer.ssm
    Lambda = torch.complex(ssm.lambda_re, ssm.lambda_im)
    B = torch.complex(ssm.B[..., 0], ssm.B[..., 1])
    step = torch.exp(ssm.log_step)
    P, H = B.shape
    block = torch.zeros(P + H, P + H, dtype=torch.complex128)
    block[:P, :P] = torch.diag(Lambda * step)
    block[:P, P:] = step[:, None] * B
    exp = torch.linalg.matrix_exp(block)
    Lambda_bar, B_bar = (torch.view_as_complex(t) for t in ssm.discretized(torch.float64))
    torch.testing.assert_close(torch.diagonal(exp[:P, :P]), Lambda_bar, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exp[:P, P:], B_bar, rtol=1e-12, atol=1e-12)
    Lambda0, V = s5_mixer.hippo_n_eigen(6)
    one = torch.full((6,), 0.05, dtype=torch.float64)
    bar, _ = s5_mixer.zoh(torch.view_as_real(Lambda0), torch.zeros(6, 1, 2, dtype=torch.float64), one)
    bar = torch.view_as_complex(bar)
    expm = torch.linalg.matrix_exp(s5_mixer.hippo_n(6) * 0.05)
    torch.testing.assert_close((V @ torch.diag(bar) @ V.conj().T).real, expm, rtol=1e-12, atol=1e-12)


def _s5_pytorch_and_ours(H=8, P=6, seed=0):
    import s5  # s5-pytorch==0.2.1, a test extra
    torch.manual_seed(seed)
    theirs = s5.S5(H, P)  # dense B, C; ZOH; all P states (no conjugate halving)
    layer, _ = make_layer(d_model=H, s5_state=P, s5_conj_sym=False)
    layer = layer.float()
    seq = theirs.seq
    with torch.no_grad():
        layer.ssm.lambda_re.copy_(seq.Lambda.real)
        layer.ssm.lambda_im.copy_(seq.Lambda.imag)
        layer.ssm.log_step.copy_(seq.log_step.reshape(-1))
        layer.ssm.B.copy_(seq.B)
        layer.ssm.C.copy_(torch.view_as_real(seq.C))
        layer.ssm.D.copy_(seq.D)
    return theirs, layer


def test_equals_s5_pytorch_on_the_same_weights():
    theirs, layer = _s5_pytorch_and_ours()
    u = torch.randn(2, 25, 8, generator=torch.Generator().manual_seed(4))  # s5-pytorch: [b, s, H]
    with torch.no_grad():
        expected = theirs(u)
        got = layer.ssm(u.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # its step mode (forward_rnn), from a zero state (its initial_state() is broken upstream)
    state, ours = torch.zeros(6, dtype=torch.complex64), layer.ssm.init_state(1)  # ours: [1, 6, 2], real pairs
    with torch.no_grad():
        for t in range(25):
            y_theirs, state = theirs.seq.forward_rnn(u[0, t], state)
            y_ours, ours = layer.ssm.step(u[0, t][None], ours, first=t == 0)
            torch.testing.assert_close(y_ours[0], y_theirs, rtol=1e-5, atol=1e-5)


def test_bad_state_sizes_are_refused_in_one_line():
    with pytest.raises(ValidationError, match="s5_state=7 must be even with s5_conj_sym"):
        ModelConfig(pattern="S", vocab_size=64, d_model=16, s5_state=7)
    with pytest.raises(ValidationError, match="s5_dt_min=0.5 exceeds s5_dt_max=0.1"):
        ModelConfig(pattern="S", vocab_size=64, d_model=16, s5_dt_min=0.5)
    cfg = ModelConfig(pattern="S", vocab_size=64, d_model=16, s5_state=6)
    assert "does not divide the S5 stored states" in s5_mixer.check_tensor_parallel(cfg.sublayer("S"), 2)
    assert s5_mixer.check_tensor_parallel(cfg.sublayer("S"), 3) is None


def test_the_stability_monitor_reads_the_discrete_eigenvalues():
    layer, _ = make_layer(s5_monitor_eps=0.01)
    with torch.no_grad():
        layer.ssm.lambda_re[:2] = 0.01  # unstable: |Lambda_bar| > 1
        layer.ssm.lambda_re[2] = -1e-6  # within eps of the unit circle
    magnitude = torch.exp(layer.ssm.lambda_re * torch.exp(layer.ssm.log_step))
    got = layer.metrics()
    assert got["max_abs_lambda_bar"] == pytest.approx(float(magnitude.max()), abs=1e-6) and magnitude.max() > 1
    assert got["near_unit_fraction"] == pytest.approx(float((magnitude > 0.99).double().mean()), abs=1e-6)
    assert got["near_unit_fraction"] >= 3 / 4
