"""The engine's GEMM (``nograd.core.gemm``): oneDNN's float32 linear where MKL is slow, torch's
elsewhere; the same numbers as ``F.linear`` either way, chosen the same way every time, kept whole
by ``torch.compile``, and never in the way of autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nograd.core import gemm
from nograd.core.engine import BatchedPerturbation, ParamSpace, member_directions
from nograd.core.noise import SeededNoise

ONEDNN = gemm._onednn_linear_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")


@pytest.fixture
def backend():
    """Set the process's backend for one test, and put the old one back afterwards."""
    old = gemm._chosen
    yield gemm.set_backend
    gemm._chosen = old


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)])
def test_onednn_linear_equals_f_linear(backend, bias, shape):
    assert backend("onednn") == "onednn"
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(9, 12)
    b = torch.randn(9) if bias else None
    got = gemm.linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert got.shape == (*shape[:-1], 9)
    # a transposed (non-contiguous) input gives the same
    xt = torch.randn(12, 7).T
    torch.testing.assert_close(gemm.linear(xt, w, b), F.linear(xt, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["torch", pytest.param("onednn", marks=needs_onednn)])
def test_addmm_in_place_equals_the_product_added(backend, name):
    backend(name)
    torch.manual_seed(1)
    out, a, b = torch.randn(6, 40), torch.randn(6, 2), torch.randn(2, 40)
    want = out + a @ b
    got = gemm.addmm_(out, a, b)
    assert got is out
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    d = torch.randn(6, 40, dtype=torch.float64)  # float64: torch's, whatever the backend
    torch.testing.assert_close(gemm.addmm_(d.clone(), a.double(), b.double()), d + a.double() @ b.double())


def test_the_choice_follows_the_setting_and_the_vendor(monkeypatch):
    monkeypatch.setattr(gemm, "_onednn_linear_available", lambda: True)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    assert gemm.choose_backend("torch") == "torch"
    assert gemm.choose_backend("onednn") == "onednn"
    monkeypatch.setattr(gemm, "_cpu_vendor", lambda: "GenuineIntel")
    assert gemm.choose_backend("auto") == "torch"  # MKL's own CPUs: torch's default kept
    monkeypatch.setattr(gemm, "_cpu_vendor", lambda: "AuthenticAMD")
    assert gemm.choose_backend("auto") == "onednn"
    monkeypatch.setattr(gemm, "_cpu_vendor", lambda: None)
    assert gemm.choose_backend("auto") == "torch"  # unknown CPU: no guess
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    monkeypatch.setattr(gemm, "_cpu_vendor", lambda: "AuthenticAMD")
    assert gemm.choose_backend("auto") == "torch"  # no MKL, no slow path to avoid
    monkeypatch.setenv(gemm.ENV_VAR, "onednn")
    assert gemm.choose_backend() == "onednn"
    monkeypatch.setattr(gemm, "_onednn_linear_available", lambda: False)
    assert gemm.choose_backend() == "torch"  # asked for, not in this build
    with pytest.raises(ValueError, match="NOGRAD_GEMM must be one of"):
        gemm.choose_backend("fast")


@needs_onednn
def test_autograd_gets_torchs_linear(backend):
    backend("onednn")
    torch.manual_seed(0)
    x, w = torch.randn(4, 6), torch.randn(3, 6, requires_grad=True)
    gemm.linear(x, w).square().sum().backward()  # a custom op without a backward would raise here
    want = torch.autograd.grad(F.linear(x, w).square().sum(), w)[0]
    torch.testing.assert_close(w.grad, want)


@needs_onednn
def test_jvp_and_forward_mode_get_torchs_linear(backend):
    # the custom op has no forward-mode formula: through it a jvp would give a zero tangent
    backend("onednn")
    torch.manual_seed(0)
    x, t, w = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)
    _, tangent = torch.func.jvp(lambda x: gemm.linear(x, w), (x,), (t,))
    torch.testing.assert_close(tangent, F.linear(t, w))
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        dual_out = gemm.linear(fwad.make_dual(x, t), w)
        torch.testing.assert_close(fwad.unpack_dual(dual_out).tangent, F.linear(t, w))
    per_row = torch.func.vmap(lambda row: gemm.linear(row.unsqueeze(0), w))(x)
    torch.testing.assert_close(per_row.squeeze(1), F.linear(x, w), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_compiled_code_keeps_the_onednn_call_whole(backend):
    backend("onednn")
    torch.manual_seed(0)
    x, w, b = torch.randn(16, 8), torch.randn(32, 8), torch.randn(32)
    fn = lambda x: F.gelu(gemm.linear(x, w) + b)  # noqa: E731
    explained = torch._dynamo.explain(fn)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch.testing.assert_close(torch.compile(fn)(x), F.gelu(F.linear(x, w, b)), atol=1e-5, rtol=1e-5)


def test_linears_through_routes_and_restores(backend, monkeypatch):
    backend("torch")
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    calls = []
    real = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 4)
    with torch.no_grad():
        want = model(x)
        with gemm.linears_through(model):
            got = model(x)
    assert len(calls) == 2
    torch.testing.assert_close(got, want)
    assert all("forward" not in vars(m) for m in model)


@needs_onednn
@pytest.mark.parametrize("compile", [False, True])
def test_the_population_is_the_same_with_either_gemm(backend, compile):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    space, noise = ParamSpace(model, rank=1), SeededNoise(1)
    rows = torch.randn(4, 6).repeat(8, 1)
    dirs = member_directions(range(8), 0.1)
    out = {}
    for name in ("torch", "onednn"):
        backend(name)
        batched = BatchedPerturbation(model, space, noise, compile=compile)
        with batched.apply(2, dirs):
            out[name] = model(rows)
    torch.testing.assert_close(out["onednn"], out["torch"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out["onednn"], model(rows))  # perturbed


def test_the_docstring_example_runs():
    import doctest

    assert doctest.testmod(gemm).failed == 0


@needs_onednn
@pytest.mark.parametrize("optimizer", ["mezo", "adamw", "forward-grad"])
def test_training_runs_its_no_grad_forwards_through_the_engines_gemm(
    backend, monkeypatch, tmp_path, optimizer
):
    from _foundation import tiny_config

    from nograd.workbench import train

    summaries = {}
    for name in ("torch", "onednn"):
        backend(name)
        routed = []
        real = gemm._onednn_linear
        monkeypatch.setattr(
            gemm, "_onednn_linear", lambda *a, real=real, routed=routed: routed.append(1) or real(*a)
        )
        (tmp_path / name).mkdir()
        summaries[name] = train(tiny_config(tmp_path / name, optimizer=optimizer, steps=2, eval_every=2))
        monkeypatch.setattr(gemm, "_onednn_linear", real)
        assert summaries[name]["gemm"] == name and summaries[name]["steps"] == 2
        assert bool(routed) == (name == "onednn")  # the evaluations (and MeZO's forwards) went through oneDNN
    # the same run either way, up to the kernels' rounding
    assert summaries["onednn"]["final_val_loss"] == pytest.approx(
        summaries["torch"]["final_val_loss"], abs=1e-4
    )
