"""The CUDA FFI backend beyond the shared backend test: shapes, modes, transforms, graphs.

GPU tests are marked ``gpu``; the CPU test checks that the chooser says why the
CUDA backend refuses there. References are float64 products of the operands as
the format defines them, computed on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reset_jax.nvfp4 import api, cuda
from reset_jax.nvfp4 import format as fmt

REL_TOL = 5e-3
HAS_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu


def _cpu(a):
    return jax.device_put(a, jax.devices("cpu")[0])


def _inputs(tag: str, m: int, n: int, k: int):
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-3, 4, (1, k)))
    x = rng.standard_normal((m, k)) * np.exp2(rng.integers(-2, 3, (m, 1))) + 0.05
    # Quantized on the default device: quantizing on the CPU inside a GPU process
    # made each test take over a minute on the device machine (2026-11-27).
    return jnp.asarray(x, jnp.bfloat16), fmt.quantize(jnp.asarray(w, jnp.float32))


def _reference(x, q, activations, input_scale) -> np.ndarray:
    """float64 ``x_used @ dequantize(q).T`` on the CPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        qc = jax.tree.map(_cpu, q)
        w = np.asarray(fmt.dequantize(qc, jnp.float32), np.float64)
        xc = _cpu(x)
        if activations == "nvfp4":
            xu = np.asarray(fmt.fake_quantize_activations(xc, input_scale), np.float64)
        else:
            xu = np.asarray(xc, np.float64)
    return xu @ w.T


def _rel_err(y, want) -> float:
    y = np.asarray(y, np.float64)
    assert y.shape == want.shape
    return float(np.linalg.norm(y - want) / np.linalg.norm(want))


def _cuda(x, q, activations="bf16", input_scale=None):
    return api.matmul(x, q, activations=activations, input_scale=input_scale, implementation="cuda")


# --------------------------------------------------------------------------
# CPU: the refusal is explained
# --------------------------------------------------------------------------


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only refusal")
def test_cuda_refuses_on_cpu_with_a_reason():
    x, q = _inputs("cpu", 2, 8, 32)
    [(name, reason)] = api.explain(x, q, implementation="cuda")
    assert name == "cuda" and reason is not None and "not on a CUDA GPU" in reason
    with pytest.raises(api.BackendUnavailableError, match="cuda: not on a CUDA GPU"):
        _cuda(x, q)
    # The default order falls through to a backend that serves it.
    assert api.matmul(x, q).shape == (2, 8)


def test_codes_order_attribute_matches_the_kernels_numbering():
    """``GemvArgs::codes_order``: 0 natural, 1 MMA word order (every handler takes it)."""
    assert cuda.codes_order_attr("natural") == 0 and cuda.codes_order_attr("mma") == 1
    assert cuda.codes_order_attr("mma").dtype == np.int32
    with pytest.raises(ValueError):
        cuda.codes_order_attr("bogus")


def test_missing_library_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda, "_explicit_path", tmp_path / "nothing.so")
    cuda._library.cache_clear()
    try:
        lib, reason = cuda._library()
        assert lib is None and "is not built" in reason and "nothing.so" in reason
    finally:
        monkeypatch.undo()
        cuda._library.cache_clear()


def test_stale_library_is_a_reason(monkeypatch, tmp_path):
    """A library built from an older checkout (here: one with only the first handler's
    symbol) counts as absent, with a reason that names what it lacks, so every CUDA path
    falls back instead of failing when it is traced."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    (tmp_path / "old.c").write_text("void ResetJaxNvfp4W4A16(void) {}\n")
    so = tmp_path / "libold.so"
    subprocess.run([cc, "-shared", "-fPIC", str(tmp_path / "old.c"), "-o", str(so)], check=True)
    monkeypatch.setattr(cuda, "_explicit_path", so)
    cuda._library.cache_clear()
    try:
        lib, reason = cuda._library()
        assert lib is None and "predates" in reason and str(so) in reason
        assert "ResetJaxTopKScaled" in reason and "ResetJaxNvfp4W4A16" not in reason
    finally:
        monkeypatch.undo()
        cuda._library.cache_clear()


def test_refusal_reasons_independent_of_platform():
    x, q = _inputs("reasons", 17, 8, 32)
    with pytest.raises(NotImplementedError, match="M=17 > 16"):
        cuda.supports(x, q, activations="bf16")
    with pytest.raises(NotImplementedError, match="bfloat16"):
        cuda.supports(x[:2].astype(jnp.float32), q, activations="bf16")


# --------------------------------------------------------------------------
# GPU: correctness over shapes and modes
# --------------------------------------------------------------------------

SHAPES = [
    # (M, N, K): every M, odd N, K = 16 * odd (incl. 576 = 16 * 36 of SmolLM2)
    (1, 7, 16),
    (2, 1, 48),
    (3, 33, 144),
    (4, 17, 576),
    (5, 257, 576),
    (6, 9, 1040),
    (7, 65, 208),
    (8, 300, 4096),
    (9, 31, 80),
    (10, 5, 576),
    (11, 129, 1024),
    (12, 3, 336),
    (13, 47, 592),
    (14, 16, 32),
    (15, 99, 2064),
    (16, 513, 1536),
    # K % 256 == 0 with M <= 2, or M = 8 over enough 16-row tiles (>= 4M/9 per
    # resident CTA on a 132-SM H100): the wide kernel (ffi/nvfp4_kernels.cuh).
    (1, 33, 512),
    (2, 100, 2560),
    (8, 15040, 256),
    # M = 1 with long rows and more 16-row tiles than 8-warp CTA slots (282 on 264): the
    # wide kernel in K pairs, 8-row tiles (KPairUnits in ffi/nvfp4_kernels.cuh).
    (1, 4500, 8192),
    # At M = 8 on a 132-SM Hopper GPU: the general kernel on 4-warp CTAs at U = 4 (640
    # tiles) and on 12-warp CTAs (384 tiles; GemvShapeFor), and the wide kernel on one
    # 16-warp CTA an SM (90 KB of staged activations; WideXsOneCta).
    (8, 10240, 5120),
    (8, 6144, 4096),
    (8, 16000, 5120),
]


@gpu
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize(
    ("activations", "input_scale"), [("bf16", None), ("nvfp4", None), ("nvfp4", 0.0031)]
)
def test_matches_reference(m, n, k, activations, input_scale):
    x, q = _inputs(f"{m}-{n}-{k}-{activations}", m, n, k)
    y = jax.jit(lambda x, q: _cuda(x, q, activations, input_scale))(x, q)
    assert y.dtype == jnp.bfloat16 and y.shape == (m, n)
    err = _rel_err(y, _reference(x, q, activations, input_scale))
    assert err <= REL_TOL, f"relative error {err:.2e}"


@gpu
@pytest.mark.parametrize("shift", [40, -40])
@pytest.mark.parametrize(("n", "k"), [(33, 512), (4500, 8192)])
def test_one_row_activation_range(shift, n, k):
    """At M = 1 the wide kernel (S1 form, 16-row tiles and K pairs) stages the activations
    times 2**64: activations of magnitude 2**40 must not overflow, those of 2**-40 must
    not underflow (either would break this test; a staging scale of 2**100 broke the first).
    """
    x, q = _inputs(f"range{n}", 1, n, k)
    x = x * jnp.bfloat16(2.0**shift)  # exact: a power of two
    y = jax.jit(_cuda)(x, q)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert _rel_err(y, _reference(x, q, "bf16", None)) <= REL_TOL


@gpu
@pytest.mark.parametrize("input_scale", [None, 0.0023])
def test_w4a4_activation_quantizer_is_bit_exact(input_scale):
    """The kernel's quantized activations equal format.quantize_activations bit for bit."""
    m, n, k = 5, 24, 16 * 37
    x, q = _inputs("quantizer", m, n, k)
    x = x.at[2].set(0)  # an all-zero row: per-row scale 1
    x = x.at[3, :16].multiply(1e-30)  # a block whose scale underflows to 0 -> 1
    cuda._register()
    per_row = input_scale is None
    s = jnp.float32(1 if per_row else input_scale)
    _, xhat, gx = jax.ffi.ffi_call(
        cuda.TARGET_W4A4,
        (
            jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((m,), jnp.float32),
        ),
        vmap_method="sequential",
    )(
        x,
        q.packed,
        q.scales,
        jnp.asarray(q.global_scale, jnp.float32),
        s,
        per_row_scale=np.bool_(per_row),
        codes_order=np.int32(0),
    )
    with jax.default_device(jax.devices("cpu")[0]):
        xq = fmt.quantize_activations(_cpu(x), input_scale)
        want_v = np.asarray(fmt.dequantize_blocks(xq), np.float32)
        want_g = np.broadcast_to(np.asarray(xq.global_scale, np.float32).reshape(-1), (m,))
    np.testing.assert_array_equal(np.asarray(xhat, np.float32), want_v)
    np.testing.assert_array_equal(np.asarray(gx), want_g)


@gpu
def test_outputs_fully_written():
    """The output lives in a donated NaN-filled buffer: every element must be overwritten."""
    m, n, k = 7, 333, 576
    x, q = _inputs("poison", m, n, k)

    def f(poison, x, q):
        del poison
        return _cuda(x, q)

    g = jax.jit(f, donate_argnums=0)
    for _ in range(3):
        poison = jnp.full((m, n), jnp.nan, jnp.bfloat16)
        ptr = poison.unsafe_buffer_pointer()
        y = g(poison, x, q)
        if y.unsafe_buffer_pointer() != ptr:
            pytest.skip("XLA did not reuse the donated buffer for the output")
        assert not np.isnan(np.asarray(y, np.float32)).any()
    assert _rel_err(y, _reference(x, q, "bf16", None)) <= REL_TOL


@gpu
def test_deterministic():
    x, q = _inputs("det", 8, 1000, 4096)
    f = jax.jit(_cuda)
    a, b = np.asarray(f(x, q)), np.asarray(f(x, q))
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


# --------------------------------------------------------------------------
# GPU: transforms
# --------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("activations", ["bf16", "nvfp4"])
def test_vmap_folds_batch_into_m(activations):
    # 3 x 7 = 21 rows: two launches of <= 16 rows.
    n, k = 40, 160
    x, q = _inputs(f"vmap{activations}", 21, n, k)
    xs = x.reshape(3, 7, k)
    ys = jax.jit(jax.vmap(lambda x: _cuda(x, q, activations), in_axes=0))(xs)
    assert ys.shape == (3, 7, n)
    want = _reference(x, q, activations, None).reshape(3, 7, n)
    assert _rel_err(ys, want) <= REL_TOL
    txt = jax.jit(jax.vmap(lambda x: _cuda(x, q, activations))).lower(xs).as_text()
    assert txt.count("custom_call @reset_jax_nvfp4") == 2


@gpu
def test_vmap_over_weights_maps_sequentially():
    k = 64
    x, _ = _inputs("vw", 2, 8, k)
    qs = [_inputs(f"vw{i}", 1, 8, k)[1] for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    ys = jax.jit(jax.vmap(lambda q: _cuda(x, q)))(stacked)
    for i, q in enumerate(qs):
        assert _rel_err(ys[i], _reference(x, q, "bf16", None)) <= REL_TOL


@gpu
def test_scan_and_while_loop():
    m, n, k = 4, 96, 256
    x0, q = _inputs("loop", m, n, k)

    def step(x, _):
        y = _cuda(x, q)  # [M, N]
        # The next input is exact in any compilation (a power-of-two scale of bf16
        # values): an elementwise tail with tanh or a multiply-add may round
        # differently in the unrolled and the looped program (seen on an H100),
        # which would test XLA's fusion choices rather than the custom call.
        nxt = jnp.tile(y, (1, 3))[:, :k] * jnp.bfloat16(2.0**-5)
        return nxt, y

    def unrolled(x):
        ys = []
        for _ in range(5):
            x, y = step(x, None)
            ys.append(y)
        return x, jnp.stack(ys)

    want_x, want_ys = jax.jit(unrolled)(x0)
    got_x, got_ys = jax.jit(lambda x: jax.lax.scan(step, x, None, length=5))(x0)
    np.testing.assert_array_equal(np.asarray(got_ys, np.float32), np.asarray(want_ys, np.float32))

    def cond(c):
        return c[0] < 5

    def body(c):
        i, x = c
        return i + 1, step(x, None)[0]

    _, wx = jax.jit(lambda x: jax.lax.while_loop(cond, body, (0, x)))(x0)
    np.testing.assert_array_equal(np.asarray(wx, np.float32), np.asarray(want_x, np.float32))
    np.testing.assert_array_equal(np.asarray(got_x, np.float32), np.asarray(want_x, np.float32))


_GRAPH_SCRIPT = textwrap.dedent(
    """
    import hashlib
    import jax, jax.numpy as jnp, numpy as np
    from reset_jax.nvfp4 import api, format as fmt
    rng = np.random.default_rng(0)
    qs = [fmt.quantize(jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)) for _ in range(3)]
    x = jnp.asarray(rng.standard_normal((2, 512)), jnp.bfloat16)

    def chain(x, act, impl, layers=12):
        # A chain of layers, as in a decode step; every call is captured in the graph.
        for i in range(layers):
            y = api.matmul(x, qs[i % 3], activations=act, implementation=impl)
            x = (y.astype(jnp.float32) * 0.05).astype(jnp.bfloat16)
        return x

    def err(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    for act in ("bf16", "nvfp4"):
        f = jax.jit(lambda x: chain(x, act, "cuda"))
        a = np.asarray(f(x), np.float32)
        b = np.asarray(f(x), np.float32)  # replayed graph
        c = np.asarray(jax.jit(lambda x: chain(x, act, "xla"))(x), np.float32)
        a1 = np.asarray(jax.jit(lambda x: chain(x, act, "cuda", 1))(x), np.float32)
        c1 = np.asarray(jax.jit(lambda x: chain(x, act, "xla", 1))(x), np.float32)
        print("SAME", act, bool(np.array_equal(a, b)))
        print("HASH", act, hashlib.sha1(a.tobytes()).hexdigest())
        print("ERR", act, err(a, c))
        print("ERR1", act, err(a1, c1))
    """
)


def _run_graph_script(command_buffers: bool) -> dict[tuple[str, str], str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + (
        " --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL"
        " --xla_gpu_graph_min_graph_size=1"
        if command_buffers
        else " --xla_gpu_enable_command_buffer="
    )
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    out = subprocess.run(
        [sys.executable, "-c", _GRAPH_SCRIPT], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = {}
    for line in out.stdout.splitlines():
        if line.startswith(("SAME ", "HASH ", "ERR ", "ERR1 ")):  # skip any other output
            kind, act, value = line.split()
            got[kind, act] = value
    assert len(got) == 8, out.stdout
    return got


@gpu
def test_inside_cuda_graphs():
    """The handlers work when XLA records them into command buffers (CUDA graphs).

    The same chain of 12 CUDA layers gives the same bits with and without
    command buffers and on a graph replay. Against the XLA backend: one layer
    within 5e-3 for both activation modes, and 12 W4A16 layers within 2e-2. Twelve W4A4
    layers are not compared: a one-ulp bf16 difference between two correct
    backends (their sums round in a different order) moves activations across
    E2M1 rounding boundaries and compounds; on the CPU, perturbing a quarter of
    the outputs of the XLA chain by one ulp moves its result by 39% (W4A4)
    against 1.5% (bf16), and the CUDA chain differs from XLA by 38% on an H100.
    """
    graphs, plain = _run_graph_script(True), _run_graph_script(False)
    for act in ("bf16", "nvfp4"):
        assert graphs["SAME", act] == "True", act
        assert graphs["HASH", act] == plain["HASH", act], (act, graphs, plain)
        assert float(graphs["ERR1", act]) <= 5e-3, (act, graphs)
    # Twelve chained layers compound the bf16 rounding of each output.
    assert float(graphs["ERR", "bf16"]) <= 2e-2, graphs


# --------------------------------------------------------------------------
# GPU: the handler's own checks
# --------------------------------------------------------------------------


@gpu
def test_handler_rejects_bad_shapes_with_a_message():
    cuda._register()
    x = jnp.ones((2, 64), jnp.bfloat16)
    packed = jnp.zeros((8, 32), jnp.uint8)
    scales = jnp.zeros((8, 3), jnp.float8_e4m3fn)  # should be [8, 4]
    g = jnp.float32(1)

    def call(x, packed, scales, m, n, order=0):
        return jax.ffi.ffi_call(
            cuda.TARGET_W4A16, jax.ShapeDtypeStruct((m, n), jnp.bfloat16), vmap_method="sequential"
        )(x, packed, scales, g, codes_order=np.int32(order))

    with pytest.raises(Exception, match=r"scales \[8, 3\] do not match codes \[8, 32\]"):
        jax.block_until_ready(call(x, packed, scales, 2, 8))
    with pytest.raises(Exception, match=r"M = 17 rows; this kernel serves 1\.\.16"):
        jax.block_until_ready(
            call(
                jnp.ones((17, 64), jnp.bfloat16),
                packed,
                jnp.zeros((8, 4), jnp.float8_e4m3fn),
                17,
                8,
            )
        )
    with pytest.raises(Exception, match="x must be bfloat16"):
        jax.block_until_ready(
            call(jnp.ones((2, 64), jnp.float32), packed, jnp.zeros((8, 4), jnp.float8_e4m3fn), 2, 8)
        )
    with pytest.raises(Exception, match=r"y \[2, 9\] must be \[M, N\] = \[2, 8\]"):
        jax.block_until_ready(call(x, packed, jnp.zeros((8, 4), jnp.float8_e4m3fn), 2, 9))
    with pytest.raises(Exception, match=r"codes_order must be 0 \(natural\) or 1"):
        jax.block_until_ready(call(x, packed, jnp.zeros((8, 4), jnp.float8_e4m3fn), 2, 8, order=2))


@gpu
@pytest.mark.parametrize(("m", "n", "k"), [(1, 33, 512), (1, 4500, 8192), (2, 100, 2560),
                                           (8, 15040, 256), (5, 257, 576), (13, 47, 592),
                                           (16, 513, 1536)])  # fmt: skip
@pytest.mark.parametrize("activations", ["bf16", "nvfp4"])
def test_mma_code_order_gives_the_same_bits(m, n, k, activations):
    """Codes in the MMA word order (``to_code_order``): every kernel path (wide, K pairs,
    general; W4A16, W4A4; the fused add + norm) returns exactly the natural order's bits."""
    x, q = _inputs(f"mma-{m}-{n}-{k}", m, n, k)
    qm = fmt.to_code_order(q, "mma")
    assert qm.code_order == "mma" and not np.array_equal(
        np.asarray(qm.packed), np.asarray(q.packed)
    )
    f = jax.jit(lambda x, q: _cuda(x, q, activations, None))
    np.testing.assert_array_equal(np.asarray(f(x, qm), np.float32), np.asarray(f(x, q), np.float32))
    if activations == "bf16":
        h = x[::-1] * 0.5
        w = jnp.asarray(np.random.default_rng(k).uniform(0.5, 1.5, (k,)), jnp.bfloat16)
        g = jax.jit(lambda q: cuda.add_rms_norm_matmul(x, h, w, 1e-6, q))
        for a, b in zip(g(qm), g(q)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@gpu
def test_library_is_found_and_serves_by_default():
    assert cuda.library_path() is not None
    x, q = _inputs("default", 3, 64, 128)
    assert dict(api.explain(x, q))["cuda"] is None
    txt = jax.jit(lambda x, q: api.matmul(x, q)).lower(x, q).as_text()
    assert "reset_jax_nvfp4_w4a16" in txt
