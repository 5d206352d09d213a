"""Every NVFP4 matmul backend against one float64 reference, and the chooser.

The reference multiplies the dequantized operands in float64: the weight as
stored in the ``NVFP4Tensor`` (decoded by the PyTorch reference), and for W4A4
the activations fake-quantized by the PyTorch reference.
"""

from __future__ import annotations

import importlib.util
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import torch_nvfp4 as ref

from reset_jax.nvfp4 import api
from reset_jax.nvfp4 import format as fmt

REL_TOL = 5e-3
ON_CPU = jax.default_backend() == "cpu"


def _present(name: str) -> bool:
    return importlib.util.find_spec(f"reset_jax.nvfp4.{name}") is not None


PRESENT = tuple(n for n in api.BACKENDS if _present(n))
# The default order once every backend module exists; until then, the ones that do.
DEFAULT = None if PRESENT == api.BACKENDS else PRESENT


def _reference(x, q, activations, input_scale) -> np.ndarray:
    """float64 ``x_used @ dequantize(q).T``; ``x_used`` is fake-quantized for W4A4."""
    w = ref.dequantize(
        torch.from_numpy(np.array(q.packed)),
        torch.from_numpy(np.asarray(q.scales).astype(np.float32)),
        torch.from_numpy(np.asarray(q.global_scale, np.float32)),
    ).double()
    x32 = torch.from_numpy(np.asarray(x, np.float32))
    if activations == "nvfp4":
        x32 = ref.quantize_activations(x32, input_scale).dequantized
    return (x32.double() @ w.T).numpy()


def _rel_err(y, want) -> float:
    y = np.asarray(y, np.float64)
    assert y.shape == want.shape
    return float(np.linalg.norm(y - want) / np.linalg.norm(want))


def _inputs(seed_text: str, lead, n, k, dtype):
    rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
    # Per-column magnitudes vary so blocks get different scales; nothing is zero.
    w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-3, 4, (1, k)))
    x = rng.standard_normal((*lead, k)) + 0.1
    return jnp.asarray(x, dtype), fmt.quantize(jnp.asarray(w, jnp.float32))


def _require(backend, x, q, activations):
    """Skips a backend that cannot serve this call, except where it must."""
    if not _present(backend):
        assert backend != "xla", "the XLA backend must exist"
        pytest.skip(f"reset_jax.nvfp4.{backend} does not exist yet")
    [(_, reason)] = api.explain(x, q, activations=activations, implementation=backend)
    if reason is None:
        return
    if backend == "xla" or (backend == "pallas" and ON_CPU):
        pytest.fail(f"{backend} must serve this call (interpret mode on CPU) but said: {reason}")
    pytest.skip(f"{backend}: {reason}")


# (leading axes of x, N, K, x dtype, activations, input_scale)
CASES = [
    pytest.param((1,), 7, 16 * 3, jnp.bfloat16, "bf16", None, id="M1-bf16-W4A16"),
    pytest.param((3,), 33, 16 * 37, jnp.bfloat16, "nvfp4", None, id="M3-bf16-W4A4-rowscale"),
    pytest.param((2, 4), 17, 16 * 5, jnp.float32, "bf16", None, id="M2x4-f32-W4A16"),
    pytest.param((16,), 9, 16 * 3, jnp.float16, "nvfp4", 0.004, id="M16-f16-W4A4-input_scale"),
    pytest.param((5,), 31, 16 * 7, jnp.float16, "bf16", None, id="M5-f16-W4A16"),
]
BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.gpu) if b == "cuda" else b for b in api.BACKENDS
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize(("lead", "n", "k", "dtype", "activations", "input_scale"), CASES)
def test_backend_matches_reference(backend, lead, n, k, dtype, activations, input_scale):
    x, q = _inputs(f"{lead}{n}{k}{np.dtype(dtype)}{activations}", lead, n, k, dtype)
    _require(backend, x, q, activations)

    def f(x, q):
        return api.matmul(
            x, q, activations=activations, input_scale=input_scale, implementation=backend
        )

    y = jax.jit(f)(x, q)
    assert y.dtype == x.dtype and y.shape == (*lead, n)
    err = _rel_err(y, _reference(x, q, activations, input_scale))
    assert err <= REL_TOL, f"{backend}: relative error {err:.2e}"

    # vmap over an extra leading axis of x (a batch of decode steps).
    xs = jnp.stack([x, (x * 1.5 - 0.25).astype(dtype)])
    ys = jax.jit(jax.vmap(f, in_axes=(0, None)))(xs, q)
    for xi, yi in zip(xs, ys):
        err = _rel_err(yi, _reference(xi, q, activations, input_scale))
        assert err <= REL_TOL, f"{backend} under vmap: relative error {err:.2e}"


# --------------------------------------------------------------------------
# The chooser
# --------------------------------------------------------------------------


def _small():
    return _inputs("chooser", (2,), 9, 32, jnp.bfloat16)


def test_named_and_sequence_implementations():
    x, q = _small()
    want = _reference(x, q, "bf16", None)
    y = api.matmul(x, q, implementation="xla")
    assert _rel_err(y, want) <= REL_TOL
    y = api.matmul(x, q, implementation=PRESENT)
    assert _rel_err(y, want) <= REL_TOL
    reasons = dict(api.explain(x, q, implementation=PRESENT))
    assert reasons["xla"] is None


def test_unknown_or_empty_implementation_is_a_value_error():
    x, q = _small()
    with pytest.raises(ValueError, match="unknown NVFP4 matmul implementation 'triton'"):
        api.matmul(x, q, implementation="triton")
    with pytest.raises(ValueError, match="unknown NVFP4 matmul implementation 'bogus'"):
        api.matmul(x, q, implementation=("bogus", "xla"))
    with pytest.raises(ValueError, match="at least one backend"):
        api.matmul(x, q, implementation=())


def test_nobody_can_serve_lists_every_reason(monkeypatch):
    x, q = _small()

    def refusing(name):
        def refuse(*args, **kwargs):
            raise NotImplementedError(f"{name} refuses for this test")

        return types.SimpleNamespace(matmul=refuse, supports=refuse)

    monkeypatch.setattr(api, "_backend", refusing)
    with pytest.raises(api.BackendUnavailableError) as info:
        api.matmul(x, q)
    for name in api.BACKENDS:
        assert f"{name}: {name} refuses for this test" in str(info.value)
    assert isinstance(info.value, NotImplementedError)


@pytest.mark.skipif(not (_present("cuda") and ON_CPU), reason="needs cuda.py and no GPU")
def test_cuda_alone_on_cpu_is_unavailable():
    x, q = _small()
    with pytest.raises(api.BackendUnavailableError, match="cuda: "):
        api.matmul(x, q, implementation="cuda")


def test_large_m_is_served():
    # Prefill-sized M: the small-M kernels refuse, XLA serves it.
    for activations in ("bf16", "nvfp4"):
        x, q = _inputs(f"prefill{activations}", (4, 16), 24, 16 * 9, jnp.bfloat16)
        y = jax.jit(
            lambda x, q, a=activations: api.matmul(x, q, activations=a, implementation=DEFAULT)
        )(x, q)
        assert _rel_err(y, _reference(x, q, activations, None)) <= REL_TOL
    reasons = dict(api.explain(x, q, implementation=PRESENT))
    assert reasons["xla"] is None


def test_bad_arguments_fail_before_any_backend():
    x, q = _small()
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 32\]"):
        api.matmul(x[..., :16], q)
    with pytest.raises(ValueError, match="only to activations='nvfp4'"):
        api.matmul(x, q, input_scale=1.0)


def test_candidates_order():
    from reset_jax.nvfp4 import api

    assert api.candidates(None) == ("cuda", "pallas", "xla")
    assert api.candidates("xla") == ("xla",)
    assert api.candidates(["pallas", "xla"]) == ("pallas", "xla")
    assert api.candidates(()) == ()  # matmul refuses it (test above)
