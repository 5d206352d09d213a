"""Checkpoints in and out: Hugging Face safetensors, Model Optimizer NVFP4, GGUF.

Every format ends in ``build_from_state_dict``: a config plus a flat dict of
Hugging Face tensor names to host arrays. Safetensors files are memory-mapped
and read with NumPy + ``ml_dtypes`` (bf16 and float8 included), so a tensor is
copied once, to the device, when its layer is built.

Model Optimizer NVFP4 layout (see the shared ``docs/nvfp4.md``): a quantized
linear ``X`` stores ``X.weight`` uint8 ``[N, K/2]``, ``X.weight_scale``
float8_e4m3fn ``[N, K/16]``, ``X.weight_scale_2`` float32 scalar and, for W4A4,
``X.input_scale`` float32 scalar; layers listed in the quantization config's
``exclude_modules`` / ``ignore`` patterns stay dense.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import shutil
import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from reset_jax import decoder_layers, nvfp4
from reset_jax.models.config import ModelConfig
from reset_jax.models.layers import CausalLM, Embedding, Linear, LinearGroup, RMSNorm
from reset_jax.models.layers import fuse_attention as fuse_attention_ops
from reset_jax.models.layers import fuse_decoder as fuse_decoder_chain
from reset_jax.models.layers import fuse_norms as fuse_norms_into_linears
from reset_jax.models.layers import quantize_embedding as quantize_embedding_table
from reset_jax.models.llama import LlamaForCausalLM
from reset_jax.models.qwen2 import Qwen2ForCausalLM
from reset_jax.models.qwen3 import Qwen3ForCausalLM
from reset_jax.nvfp4 import NVFP4Tensor
from reset_jax.nvfp4.format import natural_packed

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "qwen3": Qwen3ForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "llama": LlamaForCausalLM,
}

# Linear layers kept dense when we quantize a dense checkpoint ourselves.
DEFAULT_EXCLUDE = ("lm_head",)

NVFP4_GROUP_SIZE = 16

# Tensors a checkpoint may carry that the model does not use, silently skipped:
# RoPE buffers and Model Optimizer's FP8 KV-cache scales (we keep the cache in the
# model dtype).
_IGNORED_SUFFIXES = (
    ".rotary_emb.inv_freq",
    ".k_scale",
    ".v_scale",
    ".q_scale",
    ".k_bmm_quantizer._amax",
    ".v_bmm_quantizer._amax",
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing or mis-shaped tensors, bad metadata."""


# ---- safetensors (NumPy + ml_dtypes, memory-mapped) ------------------------------------------

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-maps a ``.safetensors`` file.

    Args:
      path: the file.

    Returns:
      name -> read-only array view of the mapped file (no data read yet).

    Raises:
      CheckpointError: a malformed header or an unknown dtype.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from e
    size = os.path.getsize(path) - 8 - n
    data = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        if size > 0
        else np.zeros(0, np.uint8)
    )
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}"
            )
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        out[name] = data[begin:end].view(dtype).reshape(shape)
    return out


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes tensors (any dtype in ``_ST_DTYPES``, bf16 and float8 included) to a ``.safetensors`` file."""
    # np.require, not np.ascontiguousarray: the latter turns a scalar into shape (1,).
    arrays = {
        name: np.require(np.asarray(a), requirements="C") for name, a in sorted(tensors.items())
    }
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, a in arrays.items():
        code = _ST_CODES.get(a.dtype)
        if code is None:
            raise TypeError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors")
        header[name] = {
            "dtype": code,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    # Write a sibling file and rename it over `path`: arrays still memory-mapped
    # from the old file keep their (unlinked) pages instead of faulting.
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)


# ---- quantization metadata -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantMeta:
    """What a checkpoint's quantization config says.

    Attributes:
      quant_algo: ``"NVFP4"``.
      group_size: elements per block scale (16).
      exclude: module-name patterns (``fnmatch``) left dense, e.g. ``"lm_head"``.
      kv_cache_quant_algo: recorded, ignored (the cache stays in the model dtype).
    """

    quant_algo: str = "NVFP4"
    group_size: int = NVFP4_GROUP_SIZE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    kv_cache_quant_algo: str | None = None

    def excludes(self, module: str) -> bool:
        """Whether linear layer ``module`` (e.g. ``model.layers.0.mlp.up_proj``) stays dense."""
        return any(fnmatch.fnmatchcase(module, pat) for pat in self.exclude)


def read_quant_meta(
    config: Mapping[str, Any], directory: str | os.PathLike | None = None
) -> QuantMeta | None:
    """Reads the NVFP4 settings of a Model Optimizer export, or None for an unquantized checkpoint.

    Looks at ``config["quantization_config"]`` and ``hf_quant_config.json``
    (``{"quantization": {...}}``) in ``directory``.

    Raises:
      NotImplementedError: another quantization method or algorithm, or a block
        size other than 16.
    """
    qc = dict(config.get("quantization_config") or {})
    if directory is not None:
        side = Path(directory) / "hf_quant_config.json"
        if side.is_file():
            extra = json.loads(side.read_text()).get("quantization") or {}
            for k, v in extra.items():
                qc.setdefault(k, v)
    if not qc:
        return None
    method = qc.get("quant_method")
    algo = qc.get("quant_algo")
    if algo is None or (method is not None and method != "modelopt"):
        raise NotImplementedError(
            f"quantization_config with quant_method={method!r}, quant_algo={algo!r} is not "
            "supported; reset-jax reads Model Optimizer NVFP4 exports (quant_algo 'NVFP4')"
        )
    if str(algo).upper() != "NVFP4":
        raise NotImplementedError(f"quant_algo {algo!r} is not supported (only 'NVFP4')")
    group = qc.get("group_size")
    if group is None:
        for g in (qc.get("config_groups") or {}).values():
            group = (g.get("weights") or {}).get("group_size", group)
    group = int(group or NVFP4_GROUP_SIZE)
    if group != NVFP4_GROUP_SIZE:
        raise NotImplementedError(f"NVFP4 group_size {group} is not supported (only 16)")
    exclude = (
        qc.get("exclude_modules") or qc.get("ignore") or qc.get("modules_to_not_convert") or ()
    )
    return QuantMeta(
        quant_algo="NVFP4",
        group_size=group,
        exclude=tuple(str(p) for p in exclude),
        kv_cache_quant_algo=qc.get("kv_cache_quant_algo"),
    )


# ---- building a model from tensors ---------------------------------------------------------


def _to_device(a: Any) -> jax.Array:
    # An explicit host copy first: on CPU, JAX may alias a NumPy buffer, and a
    # model must not keep pages of a memory-mapped checkpoint file alive.
    return jnp.asarray(np.array(a, copy=True))


def _scalar_f32(a: np.ndarray, name: str, origin: str) -> jax.Array:
    a = np.asarray(a)
    if a.size != 1:
        raise CheckpointError(
            f"tensor {name!r} in {origin} has shape {a.shape}, expected a scalar ()"
        )
    return jnp.asarray(a.astype(np.float32).reshape(()))


@dataclasses.dataclass
class _Part:
    """One linear layer's weights before the layer is built.

    ``kind``: ``"dense"`` (weight in the model dtype), ``"quantize"`` (float32
    weight that ``quantize="nvfp4"`` will quantize) or ``"nvfp4"`` (stored
    ``NVFP4Tensor``).
    """

    kind: str
    weight: Any  # jax.Array [N, K] or NVFP4Tensor
    bias: jax.Array | None = None
    input_scale: jax.Array | None = None


def _quantize(w: jax.Array, dtype: np.dtype) -> NVFP4Tensor:
    q = nvfp4.quantize(w)
    return NVFP4Tensor(q.packed, q.scales, q.global_scale, dtype=dtype, code_order=q.code_order)


def _same_scalar(values: Sequence[jax.Array | None]) -> bool:
    if any(v is None for v in values):
        return all(v is None for v in values)
    first = np.asarray(values[0], np.float32)
    return all(np.array_equal(np.asarray(v, np.float32), first) for v in values)


def _concat_bias(parts: Sequence[_Part]) -> jax.Array | None:
    if parts[0].bias is None:
        return None
    return jnp.concatenate([p.bias for p in parts])


def _assemble(
    names: Sequence[str], sizes: Sequence[int], parts: Sequence[_Part], dtype: np.dtype, kwargs
) -> LinearGroup:
    """Builds a ``LinearGroup``: one fused ``Linear`` when the parts allow it, else one per part.

    Dense parts fuse by concatenating rows. Parts we quantize ourselves are
    quantized together, so they share one global scale (``max|W|`` over the
    group, as Model Optimizer exports do for layers that read the same input).
    Stored NVFP4 parts fuse only if ``weight_scale_2`` and ``input_scale`` agree.
    """
    kinds = {p.kind for p in parts}
    fusable = len(kinds) == 1 and (
        kinds != {"nvfp4"}
        or (
            _same_scalar([p.weight.global_scale for p in parts])
            and _same_scalar([p.input_scale for p in parts])
        )
    )
    if not fusable:
        linears = []
        for p in parts:
            w = _quantize(p.weight, dtype) if p.kind == "quantize" else p.weight
            linears.append(Linear(w, p.bias, input_scale=p.input_scale, **kwargs))
        return LinearGroup(names, sizes, linears)
    kind = parts[0].kind
    if kind == "nvfp4":
        w = NVFP4Tensor(
            jnp.concatenate([natural_packed(p.weight) for p in parts]),
            jnp.concatenate([p.weight.scales for p in parts]),
            parts[0].weight.global_scale,
            dtype=dtype,
        )
    else:
        w = jnp.concatenate([p.weight for p in parts]) if len(parts) > 1 else parts[0].weight
        if kind == "quantize":
            w = _quantize(w, dtype)
    fused = Linear(w, _concat_bias(parts), input_scale=parts[0].input_scale, **kwargs)
    return LinearGroup(names, sizes, [fused])


class _CheckpointSource:
    """Pulls and checks tensors from a name -> array dict while the model is built."""

    def __init__(
        self,
        tensors: Mapping[str, Any],
        *,
        dtype: Any,
        quantize: str | None,
        activations: str,
        implementation: str | Sequence[str] | None,
        quant_meta: QuantMeta | None,
        exclude: Sequence[str],
        origin: str,
    ):
        self.tensors = tensors
        self.dtype = np.dtype(dtype)
        self.quantize = quantize
        self.kwargs = dict(activations=activations, implementation=implementation)
        self.quant_meta = quant_meta
        self.exclude = tuple(exclude)
        self.origin = origin
        self.used: set[str] = set()
        self.progress = "quantizing layers" if quantize else "loading layers"

    def _get(self, name: str, shape: tuple[int, ...] | None, what: str = "") -> np.ndarray:
        if name not in self.tensors:
            want = f" (expected shape {shape}{what})" if shape is not None else what
            raise CheckpointError(f"missing tensor {name!r}{want} in {self.origin}")
        a = self.tensors[name]
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {self.origin} has shape {tuple(a.shape)}, expected {tuple(shape)}"
            )
        self.used.add(name)
        return a

    def _float(self, name: str, shape: tuple[int, ...], dtype=None) -> jax.Array:
        a = self._get(name, shape)
        if not np.issubdtype(a.dtype, np.floating) and a.dtype != np.dtype(ml_dtypes.bfloat16):
            raise CheckpointError(
                f"tensor {name!r} in {self.origin} has dtype {a.dtype}, expected a floating dtype"
            )
        # Copy to the device as stored, convert there (cheaper than on the host).
        return _to_device(a).astype(self.dtype if dtype is None else dtype)

    def _scalar(self, name: str) -> jax.Array:
        return _scalar_f32(self._get(name, None), name, self.origin)

    def tensor(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        return self._float(name, shape)

    def _part(self, name: str, n: int, k: int, bias: bool) -> _Part:
        b = self._float(f"{name}.bias", (n,)) if bias else None
        meta = self.quant_meta
        stored_nvfp4 = meta is not None and not meta.excludes(name)
        if stored_nvfp4 or f"{name}.weight_scale" in self.tensors:
            w = self._get(f"{name}.weight", (n, k // 2), ", uint8 NVFP4 codes")
            if w.dtype != np.uint8:
                raise CheckpointError(
                    f"tensor {name + '.weight'!r} in {self.origin} has dtype {w.dtype}; an NVFP4 "
                    "layer stores uint8 codes (list dense layers in exclude_modules)"
                )
            scales = self._get(
                f"{name}.weight_scale", (n, k // NVFP4_GROUP_SIZE), ", float8_e4m3fn"
            )
            if scales.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
                raise CheckpointError(
                    f"tensor {name + '.weight_scale'!r} in {self.origin} has dtype {scales.dtype}, "
                    "expected float8_e4m3fn"
                )
            g = self._scalar(f"{name}.weight_scale_2")
            q = NVFP4Tensor(_to_device(w), _to_device(scales), g, dtype=self.dtype)
            s = (
                self._scalar(f"{name}.input_scale")
                if f"{name}.input_scale" in self.tensors
                else None
            )
            return _Part("nvfp4", q, b, s)
        # The checkpoint's own exclude list keeps its dense layers dense.
        excluded = _matches(name, self.exclude) or (meta is not None and meta.excludes(name))
        if self.quantize == "nvfp4" and k % NVFP4_GROUP_SIZE == 0 and not excluded:
            # Quantize from the checkpoint's own precision, not from the model dtype.
            return _Part("quantize", self._float(f"{name}.weight", (n, k), jnp.float32), b)
        return _Part("dense", self._float(f"{name}.weight", (n, k)), b)

    def linear(self, name: str, out_features: int, in_features: int, bias: bool) -> Linear:
        group = self.linear_group(name, ("",), (out_features,), in_features, bias)
        return group.linears[0]

    def linear_group(
        self, prefix: str, names: Sequence[str], sizes: Sequence[int], in_features: int, bias: bool
    ) -> LinearGroup:
        parts = [
            self._part(f"{prefix}.{n}" if n else prefix, size, in_features, bias)
            for n, size in zip(names, sizes)
        ]
        return _assemble(names, sizes, parts, self.dtype, self.kwargs)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@functools.partial(jax.jit, static_argnums=(1,))
def _normal(key: jax.Array, shape: tuple[int, ...], std: float, mean: float) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32) * std + mean


class _RandomSource:
    """Random weights for tests and benchmarks (normal, std 0.02; norms near 1).

    Drawn on the default device (an 8B model in seconds on a GPU), a fresh key
    per tensor folded from ``seed``.
    """

    def __init__(self, seed: int, dtype: Any, quantize, activations, implementation, exclude):
        self.key = jax.random.key(seed)
        self.dtype = np.dtype(dtype)
        self.quantize = quantize
        self.kwargs = dict(activations=activations, implementation=implementation)
        self.exclude = tuple(exclude)
        self.count = 0
        self.progress = "building random layers"

    def _normal(self, shape, std: float, mean: float = 0.0) -> jax.Array:
        self.count += 1
        key = jax.random.fold_in(self.key, self.count)
        return _normal(key, tuple(shape), std, mean)

    def tensor(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        if name.endswith("norm.weight"):
            return self._normal(shape, 0.1, 1.0).astype(self.dtype)
        return self._normal(shape, 0.02).astype(self.dtype)

    def _part(self, name: str, n: int, k: int, bias: bool) -> _Part:
        w = self._normal((n, k), 0.02)
        b = self._normal((n,), 0.02).astype(self.dtype) if bias else None
        if (
            self.quantize == "nvfp4"
            and k % NVFP4_GROUP_SIZE == 0
            and not _matches(name, self.exclude)
        ):
            return _Part("quantize", w, b)
        return _Part("dense", w.astype(self.dtype), b)

    def linear(self, name: str, out_features: int, in_features: int, bias: bool) -> Linear:
        return _assemble(
            ("",),
            (out_features,),
            [self._part(name, out_features, in_features, bias)],
            self.dtype,
            self.kwargs,
        ).linears[0]

    def linear_group(
        self, prefix: str, names: Sequence[str], sizes: Sequence[int], in_features: int, bias: bool
    ) -> LinearGroup:
        parts = [self._part(f"{prefix}.{n}", m, in_features, bias) for n, m in zip(names, sizes)]
        return _assemble(names, sizes, parts, self.dtype, self.kwargs)


def _check_options(quantize: str | None, activations: str) -> None:
    if quantize not in (None, "nvfp4"):
        raise ValueError(f"quantize={quantize!r}; expected None or 'nvfp4'")
    if activations not in ("bf16", "nvfp4"):
        raise ValueError(f"activations={activations!r}; expected 'bf16' or 'nvfp4'")


def build_from_state_dict(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    *,
    dtype: Any = jnp.bfloat16,
    quantize: str | None = None,
    activations: str = "bf16",
    implementation: str | Sequence[str] | None = None,
    quant_meta: QuantMeta | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    origin: str = "the state dict",
) -> CausalLM:
    """Builds a model from Hugging Face-named tensors (the builder every format feeds).

    Args:
      config: the model config.
      tensors: ``name -> array`` (NumPy, memory-mapped or JAX; any float dtype
        for dense tensors; NVFP4 layers as uint8 / float8_e4m3fn / float32).
      dtype: model dtype for dense weights, activations and the cache.
      quantize: ``"nvfp4"`` quantizes every dense linear layer whose name matches
        no ``exclude`` pattern (and whose K is a multiple of 16); layers already
        NVFP4 in the checkpoint stay as they are, whatever this says.
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4). For W4A4 a layer uses
        the checkpoint's ``input_scale`` if it has one, else a per-row dynamic
        scale (layers we quantize ourselves have no calibrated ``input_scale``).
      implementation: passed to every ``nvfp4.matmul`` call (static).
      quant_meta: the checkpoint's NVFP4 settings; layers it does not exclude
        must be stored as NVFP4.
      exclude: ``fnmatch`` patterns of layers ``quantize`` leaves dense.
      origin: how to name the tensor source in error messages.

    Returns:
      ``Qwen3ForCausalLM``, ``Qwen2ForCausalLM`` or ``LlamaForCausalLM``.

    Raises:
      CheckpointError: a missing, mis-shaped or mis-typed tensor (the message
        names it, what was expected and where it was looked for).
    """
    _check_options(quantize, activations)
    source = _CheckpointSource(
        tensors,
        dtype=dtype,
        quantize=quantize,
        activations=activations,
        implementation=implementation,
        quant_meta=quant_meta,
        exclude=exclude,
        origin=origin,
    )
    model = MODEL_CLASSES[config.family](config, source)
    unused = [
        n
        for n in tensors
        if n not in source.used
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        warnings.warn(
            f"{origin}: ignored {len(unused)} unexpected tensor(s): {sorted(unused)[:5]}{more}",
            stacklevel=2,
        )
    return model


def build_model(
    config: ModelConfig,
    *,
    dtype: Any = jnp.bfloat16,
    seed: int = 0,
    quantize: str | None = None,
    activations: str = "bf16",
    implementation: str | Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    quantize_embedding: bool = False,
    fuse_norms: bool = False,
    fuse_attention: bool = False,
    fuse_decoder: str | None = None,
    pdl: bool = True,
    interleave_gate_up: bool = True,
    code_order: str = "auto",
) -> CausalLM:
    """A randomly initialized model (tests, benchmarks); same options as ``build_from_state_dict``.

    ``quantize_embedding=True`` also stores the token embedding as NVFP4
    (``layers.quantize_embedding``; with ``exclude=()`` every weight matrix is
    NVFP4), e.g. to measure what an all-NVFP4 model would weigh and decode at.
    ``fuse_norms=True`` folds the residual adds and norms into the NVFP4
    matmuls after them (``layers.fuse_norms``); ``fuse_attention=True`` runs each
    decode step's attention as one ``reset_jax.attention.decode_attention`` call
    (``layers.fuse_attention``); ``fuse_decoder="layer"`` or ``"model"`` runs decode
    steps through whole-layer custom calls (``layers.fuse_decoder``, with ``pdl``,
    ``interleave_gate_up`` and ``code_order``).
    """
    _check_options(quantize, activations)
    source = _RandomSource(seed, dtype, quantize, activations, implementation, exclude)
    model = MODEL_CLASSES[config.family](config, source)
    return apply_build_options(
        model,
        implementation=implementation,
        quantize_embedding=quantize_embedding,
        fuse_norms=fuse_norms,
        fuse_attention=fuse_attention,
        fuse_decoder=fuse_decoder,
        pdl=pdl,
        interleave_gate_up=interleave_gate_up,
        code_order=code_order,
    )


def apply_build_options(
    model: CausalLM,
    *,
    implementation: str | Sequence[str] | None = None,
    quantize_embedding: bool = False,
    fuse_norms: bool = False,
    fuse_attention: bool = False,
    fuse_decoder: str | None = None,
    pdl: bool = True,
    interleave_gate_up: bool = True,
    code_order: str = "auto",
) -> CausalLM:
    """``build_model``'s options that act on a built model, for a model built any way.

    In ``build_model``'s order: the NVFP4 embedding, folded norms, one-call attention,
    whole-layer calls (see ``build_model`` for each). A loaded checkpoint
    (``from_pretrained``) gets the same variants as a random model this way.

    Args:
      model: a ``CausalLM`` (changed in place).
      implementation: NVFP4 backend(s) for the quantized embedding's tied output layer.
      quantize_embedding, fuse_norms, fuse_attention, fuse_decoder, pdl,
        interleave_gate_up, code_order: as in ``build_model``.

    Returns:
      ``model``.
    """
    if quantize_embedding:
        quantize_embedding_table(model, implementation)
    if fuse_norms:
        fuse_norms_into_linears(model)
    if fuse_attention:
        fuse_attention_ops(model)
    if fuse_decoder is not None:
        fuse_decoder_chain(
            model,
            fuse_decoder,
            pdl=pdl,
            interleave_gate_up=interleave_gate_up,
            code_order=code_order,
        )
    return model


# ---- from_pretrained ------------------------------------------------------------------------


def _looks_like_path(s: str) -> bool:
    return (
        os.sep in s
        or (os.altsep is not None and os.altsep in s)
        or s.startswith(("~", "."))
        or s.endswith((".gguf", ".safetensors", ".json"))
    )


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if isinstance(path, os.PathLike) or _looks_like_path(str(path)):
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: no such file or directory (expected a Hugging Face "
            "directory with config.json, a Model Optimizer NVFP4 export, a .gguf file, or a model name)"
        )
    from reset_jax.hub import resolve  # deferred: names are the rare case

    return Path(resolve(str(path)))


def _safetensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted({directory / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {absent}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt")
        )
        hint = f" (found {others}; only safetensors are supported)" if others else ""
        raise CheckpointError(f"no *.safetensors files in {directory}{hint}")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    quantize: str | None = None,
    activations: str = "bf16",
    implementation: str | Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> CausalLM:
    """Loads a checkpoint into a Flax NNX model.

    Args:
      path: a Hugging Face directory (``config.json`` + ``model.safetensors`` or
        shards with ``model.safetensors.index.json``), a Model Optimizer NVFP4
        export (same, with ``quantization_config`` / ``hf_quant_config.json``),
        a ``.gguf`` file, or a model name for ``reset_jax.hub.resolve``.
      dtype: model dtype (dense weights, activations, cache).
      quantize: ``None`` or ``"nvfp4"`` (quantize dense linears except
        ``exclude``; an NVFP4 export is loaded as stored either way).
      activations: ``"bf16"`` (W4A16) or ``"nvfp4"`` (W4A4; see
        ``build_from_state_dict`` for the activation scale).
      implementation: NVFP4 backend(s) for every ``nvfp4.matmul`` call.
      exclude: layers ``quantize="nvfp4"`` leaves dense (``fnmatch`` patterns).

    Returns:
      The model (``CausalLM`` subclass for the checkpoint's architecture).

    Raises:
      FileNotFoundError: no such path (or no ``config.json`` in the directory).
      ValueError: unknown architecture (from ``ModelConfig.from_hf``).
      CheckpointError: missing, mis-shaped or mis-typed tensors.
    """
    _check_options(quantize, activations)
    p = _resolve(path)
    common = dict(
        dtype=dtype,
        quantize=quantize,
        activations=activations,
        implementation=implementation,
        exclude=exclude,
    )
    if p.is_file():
        if p.suffix != ".gguf":
            raise FileNotFoundError(
                f"{p} is a file but not a .gguf; pass the checkpoint directory that holds config.json"
            )
        from reset_jax.models.gguf import load_gguf

        hf_config, tensors = load_gguf(p)
        config = ModelConfig.from_hf(hf_config)
        return build_from_state_dict(config, tensors, origin=str(p), **common)
    config_path = p / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{p} has no config.json; is it a Hugging Face checkpoint directory?"
        )
    hf_config = _read_json(config_path)
    gen_path = p / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    config = ModelConfig.from_hf(hf_config, gen)
    meta = read_quant_meta(hf_config, p)
    files = _safetensor_files(p)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    origin = f"{p} ({', '.join(f.name for f in files)})"
    return build_from_state_dict(config, tensors, quant_meta=meta, origin=origin, **common)


# ---- save_nvfp4 -----------------------------------------------------------------------------


def _module_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(k) for k in path)


def named_linears(model: CausalLM) -> list[tuple[str, Linear, tuple[int, int] | None]]:
    """Every checkpoint linear layer as ``(name, Linear, rows)``.

    ``rows`` is the ``(start, stop)`` slice of a fused ``LinearGroup`` weight
    that holds this layer, an int array of its row indices where the group's rows are
    interleaved (``LinearGroup.interleaved``, set by ``fuse_decoder``), or None for a
    layer with a weight of its own.
    """
    groups = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, LinearGroup)]
    inside = {(*path, "linears") for path, _ in groups}
    out = []
    for path, node in groups:
        parent = _module_name(path[:-1])
        names = [f"{parent}.{n}" for n in node.names]
        if node.fused and node.interleaved:
            # each part's rows: the same layout split as the group splits its outputs
            parts = decoder_layers.deinterleave_gate_up(np.arange(sum(node.sizes)))
            out += [(name, node.linears[0], rows) for name, rows in zip(names, parts)]
        elif node.fused:
            bounds = np.cumsum((0, *node.sizes)).tolist()
            out += [(n, node.linears[0], (bounds[i], bounds[i + 1])) for i, n in enumerate(names)]
        else:
            out += [(n, lin, None) for n, lin in zip(names, node.linears)]
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and path[:-1] not in inside:
            out.append((_module_name(path), node, None))
    return out


def model_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """The model's parameters as a Hugging Face-named host dict.

    NVFP4 layers appear as ``weight`` (uint8) / ``weight_scale`` (float8_e4m3fn)
    / ``weight_scale_2`` [/ ``input_scale``] (float32 scalars); fused groups are
    split back into their parts (each part repeats the shared scalars).
    """
    out: dict[str, np.ndarray] = {}
    natural: dict[int, np.ndarray] = {}  # per Linear: a fused group's parts share one conversion
    for name, lin, rows in named_linears(model):
        sl = slice(None) if rows is None else slice(*rows) if isinstance(rows, tuple) else rows
        w = lin.weight.get_value()
        if lin.quantized:
            if id(lin) not in natural:
                natural[id(lin)] = np.asarray(natural_packed(w))  # checkpoints: natural order
            out[f"{name}.weight"] = natural[id(lin)][sl]
            out[f"{name}.weight_scale"] = np.asarray(w.scales[sl])
            out[f"{name}.weight_scale_2"] = np.asarray(w.global_scale, np.float32).reshape(())
            if lin.input_scale is not None:
                scale = lin.input_scale.get_value()
                out[f"{name}.input_scale"] = np.asarray(scale, np.float32).reshape(())
        else:
            out[f"{name}.weight"] = np.asarray(w[sl])
        if lin.bias is not None:
            out[f"{name}.bias"] = np.asarray(lin.bias.get_value()[sl])
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Embedding) and node.quantized:
            raise ValueError(
                f"{_module_name(path)}: an NVFP4 embedding has no Hugging Face / Model Optimizer "
                "form (checkpoints keep it dense); save the model before quantize_embedding"
            )
        if isinstance(node, Embedding | RMSNorm):
            out[f"{_module_name(path)}.weight"] = np.asarray(node.weight.get_value())
    return out


def save_nvfp4(
    model: CausalLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer_files_from: str | os.PathLike | Any | None = None,
) -> Path:
    """Writes a Model Optimizer-style NVFP4 checkpoint that ``from_pretrained`` loads back identically.

    The directory gets ``config.json`` (with ``quantization_config``: quant_method
    ``modelopt``, quant_algo ``NVFP4``, group_size 16, ``exclude_modules`` = the
    dense linear layers), ``hf_quant_config.json`` (the same, Model Optimizer's
    side file) and ``model.safetensors`` (NVFP4 layers as ``weight`` /
    ``weight_scale`` / ``weight_scale_2`` [/ ``input_scale``], everything else in
    the model dtype).

    Args:
      model: a model with at least one NVFP4 layer (``from_pretrained(...,
        quantize="nvfp4")``).
      out_dir: created if needed; existing files of the same names are replaced.
      tokenizer_files_from: a directory whose tokenizer / generation-config files
        are copied along, or a tokenizer object with ``save_pretrained``.

    Returns:
      ``out_dir`` as a ``Path``.

    Raises:
      ValueError: the model has no NVFP4 layer.
    """
    linears = [(name, lin) for name, lin, _ in named_linears(model)]
    if not any(n.quantized for _, n in linears):
        raise ValueError(
            "save_nvfp4: the model has no NVFP4 layer; load it with quantize='nvfp4' first"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exclude = sorted(name for name, n in linears if not n.quantized)
    quant = {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": NVFP4_GROUP_SIZE,
        "exclude_modules": exclude,
    }
    from reset_jax import __version__

    producer = {"name": "reset-jax", "version": __version__}
    hf = model.config.to_hf()
    hf["torch_dtype"] = model.dtype.name
    hf["quantization_config"] = {"quant_method": "modelopt", **quant, "producer": producer}
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    (out / "hf_quant_config.json").write_text(
        json.dumps({"producer": producer, "quantization": quant}, indent=2) + "\n"
    )
    write_safetensors(out / "model.safetensors", model_tensors(model))
    if tokenizer_files_from is not None:
        if hasattr(tokenizer_files_from, "save_pretrained"):
            tokenizer_files_from.save_pretrained(out)
        else:
            src = Path(tokenizer_files_from)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, out / name)
    return out
