"""Selective scan: every backend against the sequential reference, gradients, precision and backend selection.

Inputs follow Mamba's initialisation (A = -exp(A_log) with A_log = log(1..N) + noise, step sizes whose softplus lies
in [1e-3, 0.1]), so the numbers are the ones the network sees. The numba kernels compile once per dtype (float32 and
float64, forward and backward: four compilations), which dominates this file's run time on a cold cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cipa_bundle.networks.scan import ScanBackendError, available_backends, selective_scan, selective_scan_reference
from cipa_bundle.networks.scan import dispatch
from cipa_bundle.networks.scan.cuda_backend import cuda_unavailable_reason
from cipa_bundle.networks.scan.numba_backend import numba_unavailable_reason
from cipa_bundle.networks.scan.torch_backend import selective_scan_torch

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_NUMBA = numba_unavailable_reason() is None
CPU_BACKENDS = ["torch"] + (["numba"] if HAS_NUMBA else [])
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run this module's tiny tensors on one torch thread.

    After an explicit ``torch.set_num_threads(2)`` (as tests/conftest.py does), the reference's thousands of tiny ops
    ran 5-20x slower on a busy 2-core machine (0.4 s -> 9 s for L = 4096); one thread is faster here, and the
    thread-count test below sets its own counts.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_inputs(
    batch: int,
    channels: int,
    length: int,
    nstate: int,
    groups: int,
    *,
    softplus: bool = True,
    with_bias: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random scan inputs in the ranges a freshly initialised Mamba block produces.

    ``delta`` is chosen so that the step actually used, ``softplus(delta + delta_bias)`` (or ``delta + delta_bias``
    without softplus; ``delta`` alone when the bias will not be passed), lies in [1e-3, 0.1].
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dt = torch.empty(batch, channels, length, dtype=torch.float64).uniform_(1e-3, 0.1, generator=gen)
    delta_bias = 0.1 * randn(channels)
    # delta + delta_bias is the pre-softplus step (inverse softplus of dt); without softplus it is dt itself.
    pre = torch.log(torch.expm1(dt)) if softplus else dt
    a_log = torch.log(torch.arange(1, nstate + 1, dtype=torch.float64)).expand(channels, nstate) + 0.1 * randn(
        channels, nstate
    )
    tensors = {
        "u": randn(batch, channels, length),
        "delta": pre - delta_bias[:, None] if with_bias else pre,
        "A": -torch.exp(a_log),
        "B": randn(batch, groups, nstate, length),
        "C": randn(batch, groups, nstate, length),
        "D": randn(channels),
        "delta_bias": delta_bias,
    }
    return {name: t.to(dtype) for name, t in tensors.items()}


# (batch, channels, length, d_state, groups, softplus, with D, with delta_bias); lengths that are not multiples of the
# kernels' chunks, groups of one and several channel blocks, and a DCIM-like many-short-windows shape. With d_state 16
# and an even number of channels per group the numba forward keeps each channel's states in registers
# (scan_forward_state_lanes); the d_state 16 case with 3 channels per group takes the channel-lanes forward.
CASES = [
    (2, 8, 37, 4, 4, True, True, True),
    (1, 24, 100, 16, 1, True, False, True),
    (3, 16, 65, 1, 4, False, True, False),
    (1, 136, 40, 16, 4, True, True, True),
    (12, 8, 16, 16, 4, True, True, True),
    (1, 12, 50, 16, 4, True, True, True),
    (2, 4, 1, 4, 2, False, False, False),
]
CASE_IDS = [f"b{b}-d{d}-L{L}-N{n}-G{g}-sp{int(sp)}-D{int(hd)}-bias{int(hb)}" for b, d, L, n, g, sp, hd, hb in CASES]


def _call(fn, inputs: dict[str, torch.Tensor], softplus: bool, with_d: bool, with_bias: bool, **kwargs) -> torch.Tensor:
    return fn(
        inputs["u"],
        inputs["delta"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        inputs["D"] if with_d else None,
        inputs["delta_bias"] if with_bias else None,
        softplus,
        **kwargs,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backend_matches_reference_in_float64(backend: str, case: tuple) -> None:
    batch, channels, length, nstate, groups, softplus, with_d, with_bias = case
    inputs = make_inputs(batch, channels, length, nstate, groups, softplus=softplus, with_bias=with_bias)
    expected = _call(selective_scan_reference, inputs, softplus, with_d, with_bias)
    got = _call(selective_scan, inputs, softplus, with_d, with_bias, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (batch, channels, length)
    assert (got - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES[:6], ids=CASE_IDS[:6])
def test_gradients_match_reference_autograd_in_float64(backend: str, case: tuple) -> None:
    batch, channels, length, nstate, groups, softplus, with_d, with_bias = case
    inputs = make_inputs(batch, channels, length, nstate, groups, softplus=softplus, with_bias=with_bias, seed=1)
    names = ["u", "delta", "A", "B", "C"] + (["D"] if with_d else []) + (["delta_bias"] if with_bias else [])
    grad_out = torch.randn(batch, channels, length, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(fn, **kwargs) -> list[torch.Tensor]:
        leaves = {k: v.clone().requires_grad_(k in names) for k, v in inputs.items()}
        y = _call(fn, leaves, softplus, with_d, with_bias, **kwargs)
        return list(torch.autograd.grad(y, [leaves[k] for k in names], grad_out))

    for name, got, expected in zip(names, grads(selective_scan, backend=backend), grads(selective_scan_reference)):
        assert got.shape == expected.shape, name
        assert (got - expected).abs().max().item() <= 1e-10, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend: str) -> None:
    inputs = make_inputs(1, 4, 6, 2, 2, seed=3)
    args = tuple(inputs[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))

    def scan(u, delta, A, B, C, D, delta_bias):
        return selective_scan(u, delta, A, B, C, D, delta_bias, True, backend=backend)

    assert torch.autograd.gradcheck(scan, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_agrees_with_float64_reference_on_a_long_sequence(backend: str) -> None:
    # Stage-0 length (128 x 128 / 4 = 4096): the fp32 error must not grow with the sequence.
    inputs = make_inputs(1, 8, 4096, 16, 4, seed=4)
    f32 = {k: v.float() for k, v in inputs.items()}
    # The reference runs on exactly the fp32-rounded inputs, so the comparison measures the scan's own rounding.
    expected = _call(selective_scan_reference, {k: v.double() for k, v in f32.items()}, True, True, True)
    got = _call(selective_scan, f32, True, True, True, backend=backend)
    assert got.dtype == torch.float32
    rel = ((got.double() - expected).abs().max() / expected.abs().max()).item()
    assert rel < 2e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
# 2 channels per group, and 48 (a block of 32 and one of 16 for the numba backward, so its 8 x 8 transposes run,
# next to the element-wise edges of the partial last time chunk).
@pytest.mark.parametrize("batch, channels, groups", [(2, 8, 4), (1, 96, 2)])
def test_float32_gradients_agree_with_float64(backend: str, batch: int, channels: int, groups: int) -> None:
    inputs = make_inputs(batch, channels, 300, 16, groups, seed=5)
    names = ["u", "delta", "A", "B", "C", "D", "delta_bias"]

    def grads(fn, dtype, **kwargs):
        leaves = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
        y = _call(fn, leaves, True, True, True, **kwargs)
        return torch.autograd.grad(y.square().sum(), [leaves[k] for k in names])

    got_all = grads(selective_scan, torch.float32, backend=backend)
    for name, got, expected in zip(names, got_all, grads(selective_scan_reference, torch.float64)):
        rel = ((got.double() - expected).abs().max() / expected.abs().max()).item()
        assert rel < 1e-5, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_half_precision_inputs_compute_in_float32(backend: str) -> None:
    inputs = make_inputs(1, 8, 20, 4, 2, dtype=torch.bfloat16, seed=6)
    got = _call(selective_scan, inputs, True, True, True, backend=backend)
    expected = _call(selective_scan_reference, {k: v.double() for k, v in inputs.items()}, True, True, True)
    assert got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    inputs = make_inputs(2, 8, 30, 4, 2, seed=7)
    expected = _call(selective_scan_reference, inputs, True, True, True)
    strided = {
        "u": inputs["u"].transpose(1, 2).contiguous().transpose(1, 2),  # same values, channels innermost in memory
        "delta": torch.cat([inputs["delta"], inputs["delta"]], dim=2)[:, :, :30],
        "A": inputs["A"].t().contiguous().t(),
        "B": inputs["B"].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
        "C": torch.stack([inputs["C"], inputs["C"]], dim=-1)[..., 0],
        "D": torch.stack([inputs["D"], inputs["D"]], dim=-1)[:, 1],
        "delta_bias": inputs["delta_bias"],
    }
    assert not strided["u"].is_contiguous() and not strided["C"].is_contiguous()
    got = _call(selective_scan, strided, True, True, True, backend=backend)
    assert (got - expected).abs().max().item() <= 1e-10


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [70, 300])  # 300: a second, partial row span of the state-lanes kernel
def test_both_numba_forwards_write_the_same_outputs_and_checkpoints(dtype: torch.dtype, length: int) -> None:
    from cipa_bundle.networks.scan import numba_kernels as kernels

    assert kernels.ROW_SPAN < 300
    batch, channels, nstate, groups = 2, 16, 16, 4
    inputs = {k: v.to(dtype) for k, v in make_inputs(batch, channels, length, nstate, groups, seed=9).items()}
    assert kernels.state_lanes_apply(nstate, channels, groups)
    arrays = [inputs[k].numpy() for k in ("u", "delta", "delta_bias")] + [True, inputs["A"].numpy()]
    B, C, D = inputs["B"].numpy(), inputs["C"].numpy(), inputs["D"].numpy()
    chunk, block = 32, 8
    shape = (batch, -(-length // chunk), nstate, channels)
    y_channels, y_states = np.empty((batch, channels, length), B.dtype), np.empty((batch, channels, length), B.dtype)
    ck_channels, ck_states = np.empty(shape, B.dtype), np.empty(shape, B.dtype)
    kernels.scan_forward(*arrays, B, C, D, y_channels, ck_channels, chunk, block, True,
                         0, kernels.count_items(batch, channels, groups, block))
    B_t, C_t = (np.ascontiguousarray(M.transpose(0, 1, 3, 2)) for M in (B, C))
    kernels.scan_forward_state_lanes(*arrays, B_t, C_t, D, y_states, ck_states, chunk, True,
                                     0, kernels.count_items(batch, channels, groups, kernels.STATE_LANES_PAIR))
    # The states follow the same arithmetic in both layouts; only the sum over states for y is ordered differently.
    np.testing.assert_array_equal(ck_states, ck_channels)
    np.testing.assert_allclose(y_states, y_channels, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)


@needs_numba
def test_numba_results_do_not_depend_on_the_thread_count() -> None:
    inputs = {k: v.float().requires_grad_() for k, v in make_inputs(3, 64, 50, 4, 4, seed=8).items()}
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = _call(selective_scan, inputs, True, True, True, backend="numba")
            results.append([y, *torch.autograd.grad(y.sum(), list(inputs.values()))])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_numba
def test_fast_exp_and_softplus_accuracy() -> None:
    from numba import njit

    from cipa_bundle.networks.scan.numba_kernels import fast_exp, softplus, softplus_with_slope

    @njit
    def apply(x, out_exp, out_softplus, out_slope):
        for i in range(x.shape[0]):
            out_exp[i] = fast_exp(x[i])
            out_softplus[i] = softplus(x[i])
            out_slope[i] = softplus_with_slope(x[i])[1]

    special = [0.0, -1e-30, 1e-30, 20.0, 20.5, -87.0, -100.0, 88.7, 88.8, np.nan, np.inf, -np.inf]
    x = np.concatenate([np.linspace(-86.5, 88.5, 200_001), special]).astype(np.float32)
    out_exp, out_softplus, out_slope = (np.empty_like(x) for _ in range(3))
    apply(x, out_exp, out_softplus, out_slope)
    exact = np.exp(x.astype(np.float64))
    normal = (x >= -86.5) & (x <= 88.7)
    # Within 2 float32 ulps (an ulp is 2^-23 relative at most) of the exact value over the whole range it computes.
    assert np.max(np.abs(out_exp[normal] - exact[normal]) / exact[normal]) < 2 * 2.0**-23
    assert out_exp[-7] == 0.0 and out_exp[-6] == 0.0 and out_exp[-4] == np.inf  # below -86.5: 0; overflow: inf
    assert np.isnan(out_exp[-3]) and out_exp[-2] == np.inf and out_exp[-1] == 0.0
    finite = np.isfinite(x)
    x64 = torch.from_numpy(x).double()
    exact_sp = torch.nn.functional.softplus(x64).numpy()
    # Absolute slack of 3e-38: below -86.5 the exp is 0, where softplus would be a float32 denormal.
    close = np.abs(out_softplus[finite] - exact_sp[finite]) <= 2 * 2.0**-23 * exact_sp[finite] + 3e-38
    assert close.all()
    assert np.isnan(out_softplus[-3]) and out_softplus[-2] == np.inf and out_softplus[-1] == 0.0
    # The backward's fused version: its first half is the float32 softplus checked above; the second is torch's slope
    # (sigmoid; exactly 1 above 20).
    exact_slope = torch.sigmoid(x64).numpy()
    close = np.abs(out_slope[finite] - exact_slope[finite]) <= 2 * 2.0**-23 * exact_slope[finite] + 3e-38
    assert close.all()
    assert (out_slope[x > 20] == 1.0).all() and out_slope[-2] == 1.0 and out_slope[-1] == 0.0
    assert np.isnan(out_slope[-3])
    assert out_slope[0] > 0 and (out_slope[x == 0.0] == 0.5).all()


@needs_numba
def test_fast_exp2_accuracy() -> None:
    from numba import njit

    from cipa_bundle.networks.scan.numba_kernels import fast_exp2

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = fast_exp2(x[i])

    special = [0.0, 1.0, -1.0, -124.75, -124.8, -126.0, -200.0, 127.9, 128.0, 128.5, 200.0, np.nan, np.inf, -np.inf]
    x = np.concatenate([np.linspace(-124.75, 127.99, 400_001), special]).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    exact = np.exp2(x.astype(np.float64))
    normal = (x >= -124.75) & (x < 128.0)
    # Within 1 float32 ulp (the spacing of floats at the exact value) wherever the result is a normal float.
    assert (np.abs(out[normal] - exact[normal]) < np.spacing(exact[normal].astype(np.float32))).all()
    assert out[-14] == 1.0 and out[-13] == 2.0 and out[-12] == 0.5  # exact at integers
    assert out[-10] == 0.0 and out[-9] == 0.0 and out[-8] == 0.0  # below -124.75: 0
    assert np.isfinite(out[-7]) and (out[-6:-3] == np.inf).all()  # 2^128 and above overflow
    assert np.isnan(out[-3]) and out[-2] == np.inf and out[-1] == 0.0

    # In float64 it is math.exp2.
    x64 = np.linspace(-50.0, 50.0, 1001)
    out64 = np.empty_like(x64)
    apply(x64, out64)
    np.testing.assert_allclose(out64, np.exp2(x64), rtol=1e-15, atol=0)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_transpose_writes_exactly_the_transposed_block(dtype) -> None:
    from numba import njit

    from cipa_bundle.networks.scan.numba_kernels import _transpose

    @njit
    def transpose(src, src_row, src_col, rows, cols, dst, dst_row, dst_col):
        _transpose(src, src_row, src_col, rows, cols, dst, dst_row, dst_col)

    src = np.random.default_rng(0).standard_normal((37, 45)).astype(dtype)
    # Whole 8 x 8 blocks only, blocks with edges on one or both sides, edges only, and nothing at all.
    for rows, cols in ((32, 32), (19, 13), (8, 5), (3, 16), (0, 7)):
        dst = np.full((50, 40), np.nan, dtype)
        transpose(src, 2, 3, rows, cols, dst, 4, 1)
        expected = np.full_like(dst, np.nan)
        expected[4:4 + cols, 1:1 + rows] = src[2:2 + rows, 3:3 + cols].T
        assert np.array_equal(dst, expected, equal_nan=True), (rows, cols)


def test_cache_folder_falls_back_when_the_install_is_read_only(tmp_path: Path) -> None:
    pytest.importorskip("numba")
    from cipa_bundle.networks.scan.numba_kernels import choose_cache_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    read_only = blocker / "__pycache__"  # can never be created, even by root
    fallback = tmp_path / "user-cache"
    assert choose_cache_dir(read_only, None, [blocker / "x", fallback]) == fallback
    assert fallback.is_dir()
    assert choose_cache_dir(read_only, str(tmp_path / "configured"), [fallback]) == tmp_path / "configured"
    assert choose_cache_dir(tmp_path / "writable", None, [fallback]) is None
    assert choose_cache_dir(read_only, None, [blocker / "y"]) == read_only  # nothing writable: compile uncached


# --------------------------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------------------------
CPU = torch.device("cpu")


def test_available_backends_lists_what_runs_here() -> None:
    names = available_backends()
    assert names[-2:] == ["torch", "reference"]
    assert ("numba" in names) == HAS_NUMBA
    assert ("cuda" in names) == (cuda_unavailable_reason() is None)


def test_automatic_choice_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    assert dispatch.resolve_backend(None, CPU, torch.float32) == ("numba" if HAS_NUMBA else "torch")


def test_environment_variable_and_argument_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, " Torch ")
    assert dispatch.resolve_backend(None, CPU, torch.float32) == "torch"
    assert dispatch.resolve_backend("reference", CPU, torch.float32) == "reference"
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "reference")
    inputs = make_inputs(1, 4, 9, 2, 2)
    # The environment's choice really runs: the reference is the same loop, so the result is bit-identical.
    expected = _call(selective_scan_reference, inputs, True, True, True)
    assert torch.equal(_call(selective_scan, inputs, True, True, True), expected)


def test_unknown_backend_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"'fast'.*auto, cuda, numba, torch, reference"):
        dispatch.resolve_backend("fast", CPU, torch.float32)
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "triton")
    inputs = make_inputs(1, 4, 3, 2, 2)
    with pytest.raises(ScanBackendError, match=r"'triton'.*CIPA_SCAN_BACKEND"):
        _call(selective_scan, inputs, True, True, True)


def test_unavailable_backend_says_why() -> None:
    with pytest.raises(ScanBackendError, match="needs CUDA tensors"):
        dispatch.resolve_backend("cuda", CPU, torch.float32)
    with pytest.raises(ScanBackendError, match="CPU tensors only"):
        dispatch.resolve_backend("numba", torch.device("cuda"), torch.float32)


@pytest.mark.skipif(cuda_unavailable_reason(torch.device("cuda"), torch.float32) is None, reason="mamba-ssm runs here")
def test_gpu_fallback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_warned_gpu_fallback", False)
    with pytest.warns(RuntimeWarning, match="falls back to the much slower pure-PyTorch"):
        assert dispatch.resolve_backend(None, torch.device("cuda"), torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend(None, torch.device("cuda"), torch.float32) == "torch"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update(delta=t["delta"][:, :, :-1]), "delta must have u's shape"),
        (lambda t: t.update(A=t["A"][:-1]), "A must be"),
        (lambda t: t.update(B=t["B"][:, :, :, :-1]), "B must be"),
        (lambda t: t.update(C=t["C"][:, :1]), "same number of groups"),
        (lambda t: t.update(B=t["B"][:, :3], C=t["C"][:, :3]), "multiple of the B/C groups"),
        (lambda t: t.update(D=t["D"][:-1]), "D must be"),
        (lambda t: t.update(u=t["u"][0]), "u must be"),
        (lambda t: t.update(u=t["u"].long()), "floating-point"),
        (lambda t: t.update(**{k: t[k][..., :0] for k in ("u", "delta", "B", "C")}), "at least 1"),
    ],
)
def test_invalid_shapes_are_refused(change, message: str) -> None:
    inputs = make_inputs(1, 8, 5, 2, 4)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        _call(selective_scan, inputs, True, True, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors() -> None:
    inputs = make_inputs(2, 64, 300, 16, 4, seed=9)
    expected = _call(selective_scan_reference, inputs, True, True, True)
    gpu = {k: v.float().cuda() for k, v in inputs.items()}
    for backend in [None, "torch"]:
        got = _call(selective_scan, gpu, True, True, True, backend=backend)
        assert got.is_cuda and got.dtype == torch.float32
        assert (got.double().cpu() - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
    got64 = _call(selective_scan_torch, {k: v.cuda() for k, v in inputs.items()}, True, True, True)
    assert (got64.cpu() - expected).abs().max().item() <= 1e-10


@pytest.mark.skipif(
    cuda_unavailable_reason(torch.device("cuda"), torch.float32) is not None, reason="needs CUDA and mamba-ssm"
)
@pytest.mark.parametrize("case", [(2, 64, 300, 16, 4, True, True), (1, 48, 257, 4, 2, False, True), (2, 32, 64, 16, 1, True, False)])
def test_cuda_backend_matches_reference_forward_and_backward(case: tuple) -> None:
    # mamba-ssm's kernel has no float64 version: float32 against the float64 reference, relative to the output scale.
    batch, channels, length, nstate, groups, softplus, with_d = case
    inputs = make_inputs(batch, channels, length, nstate, groups, softplus=softplus, seed=11)
    ref_in = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    expected = _call(selective_scan_reference, ref_in, softplus, with_d, True)
    expected.square().sum().backward()
    gpu_in = {k: v.float().cuda().requires_grad_(True) for k, v in inputs.items()}
    got = _call(selective_scan, gpu_in, softplus, with_d, True, backend="cuda")
    got.square().sum().backward()
    assert got.is_cuda and got.dtype == torch.float32
    assert (got.double().cpu() - expected.detach()).abs().max().item() < 1e-5 * expected.abs().max().item()
    for name, ref_leaf in ref_in.items():
        if ref_leaf.grad is None:  # D when with_d is False
            continue
        grad = gpu_in[name].grad.double().cpu()
        assert (grad - ref_leaf.grad).abs().max().item() < 1e-4 * ref_leaf.grad.abs().max().item(), name


def test_package_works_without_numba_and_mamba_ssm() -> None:
    # A fresh interpreter in which importing numba or mamba_ssm fails (None in sys.modules makes import raise).
    script = textwrap.dedent(
        """
        import sys
        sys.modules["numba"] = None
        sys.modules["mamba_ssm"] = None
        import torch
        from cipa_bundle.networks.scan import ScanBackendError, available_backends, selective_scan
        from cipa_bundle.networks.scan import selective_scan_reference
        from cipa_bundle.networks.scan.dispatch import resolve_backend
        assert available_backends() == ["torch", "reference"], available_backends()
        assert resolve_backend(None, torch.device("cpu"), torch.float32) == "torch"
        g = torch.Generator().manual_seed(0)
        u, delta = torch.randn(2, 8, 33, generator=g), torch.randn(2, 8, 33, generator=g)
        A = -torch.rand(8, 4, generator=g) - 0.5
        B, C = torch.randn(2, 4, 4, 33, generator=g), torch.randn(2, 4, 4, 33, generator=g)
        y = selective_scan(u, delta, A, B, C, None, None, True)
        ref = selective_scan_reference(u, delta, A, B, C, None, None, True)
        assert (y - ref).abs().max() < 1e-5, (y - ref).abs().max()
        try:
            selective_scan(u, delta, A, B, C, backend="numba")
        except ScanBackendError as err:
            assert "numba could not be imported" in str(err), err
        else:
            raise AssertionError("numba backend ran without numba")
        assert "numba" not in sys.modules or sys.modules["numba"] is None
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != dispatch.BACKEND_ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_torch_backend_recompute_keeps_only_inputs_and_gives_the_same_gradients() -> None:
    inputs = make_inputs(2, 16, 96, 16, 4, seed=5)
    saved_bytes = {}
    grads = {}
    for recompute in (False, True):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = selective_scan_torch(**{k: leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")},
                                     delta_softplus=True, recompute=recompute)
        y.square().sum().backward()
        saved_bytes[recompute] = total[0]
        grads[recompute] = {k: v.grad for k, v in leaves.items()}
    input_bytes = sum(t.numel() * t.element_size() for t in inputs.values())
    # Without recompute autograd keeps (b, d, L, N)-sized intermediates; with it, about the inputs (plus y for square).
    assert saved_bytes[False] > 8 * input_bytes
    assert saved_bytes[True] <= 2 * input_bytes
    for k in inputs:
        assert torch.equal(grads[True][k], grads[False][k]), k
