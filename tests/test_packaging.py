"""The installed layout: `models/` ships as `reset_jax.models`, never as a bare `models`."""

import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The CUDA library is not what this test is about: skip it to keep the build quick.
    cmd = [
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-C", "cmake.define.RESET_JAX_DISABLE_CUDA=ON",
        "-C", f"build-dir={out / 'build'}",
        "-w", str(out), str(ROOT),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    (whl,) = out.glob("reset_jax-*.whl")
    return whl


def test_wheel_has_no_bare_models_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert "models" not in top, sorted(top)
    assert "reset_jax/models/__init__.py" in names
    assert "reset_jax/nvfp4/api.py" in names


def test_installed_wheel_imports_models_only_under_reset_jax(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    # -I -S: no working directory and no .pth files (an editable install of this checkout
    # puts the repository root on sys.path); this interpreter's site-packages is added back
    # as plain paths so the dependencies import. They are taken here, where the site module
    # ran: under -S a virtual environment's python does not apply its pyvenv.cfg (Python
    # 3.11), so the child's own site.getsitepackages() names the base installation's.
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    code = (
        f"import importlib.util, sys; sys.path.insert(0, {str(target)!r});"
        f"sys.path.extend({deps!r});"
        "assert importlib.util.find_spec('models') is None, 'bare models package is importable';"
        f"import reset_jax.models as m; assert m.__file__.startswith({str(target)!r}), m.__file__;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
