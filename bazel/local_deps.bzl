"""Repository rules that wrap what the machine already has (Bazel builds offline).

* ``xla_ffi_headers``: the XLA FFI headers of the installed jax, located by
  running ``python -c "import jax; print(jax.ffi.include_dir())"`` (the
  interpreter is ``$PYTHON_BIN_PATH``, else ``python3`` on the PATH).
* ``local_cuda``: the CUDA toolkit (``$CUDA_PATH``, else the ``nvcc`` on the
  PATH, else ``/usr/local/cuda``). It exports ``NVCC`` (an absolute path: nvcc
  finds its own tools relative to its real location) for genrules.
"""

def _xla_ffi_headers_impl(rctx):
    python = rctx.os.environ.get("PYTHON_BIN_PATH") or rctx.which("python3") or rctx.which("python")
    if not python:
        fail("xla_ffi_headers: no Python found; set PYTHON_BIN_PATH to an interpreter with jax")
    res = rctx.execute([python, "-c", "import jax; print(jax.ffi.include_dir())"])
    if res.return_code != 0:
        fail("xla_ffi_headers: `%s -c 'import jax'` failed:\n%s" % (python, res.stderr))
    include = res.stdout.strip()
    if not rctx.path(include + "/xla/ffi/api/ffi.h").exists:
        fail("xla_ffi_headers: %s has no xla/ffi/api/ffi.h" % include)
    rctx.symlink(include + "/xla", "include/xla")
    rctx.file("BUILD.bazel", """\
# XLA FFI headers from jax.ffi.include_dir() (%s).
filegroup(
    name = "headers",
    srcs = glob(["include/xla/**/*.h"]),
    visibility = ["//visibility:public"],
)
""" % include)

xla_ffi_headers = repository_rule(
    implementation = _xla_ffi_headers_impl,
    environ = ["PYTHON_BIN_PATH", "PATH"],
    local = True,
)

def _local_cuda_impl(rctx):
    root = rctx.os.environ.get("CUDA_PATH", "")
    if not root:
        nvcc = rctx.which("nvcc")
        if nvcc:
            root = str(nvcc.dirname.dirname.realpath)
        else:
            root = "/usr/local/cuda"
    nvcc_path = rctx.path(root + "/bin/nvcc")
    if not nvcc_path.exists:
        fail("local_cuda: no nvcc at %s (set CUDA_PATH)" % nvcc_path)
    rctx.file("BUILD.bazel", "exports_files(['defs.bzl'])\n")
    rctx.file("defs.bzl", 'NVCC = "%s"\nCUDA_PATH = "%s"\n' % (nvcc_path.realpath, root))

local_cuda = repository_rule(
    implementation = _local_cuda_impl,
    environ = ["CUDA_PATH", "PATH"],
    local = True,
)
