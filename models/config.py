"""Model configuration: one frozen, hashable dataclass read from a Hugging Face ``config.json``.

The config is static under ``jit`` (it is hashed into the compiled function), so
every field is an immutable Python value: tuples instead of lists, and the RoPE
scaling parameters as a sorted tuple of ``(key, value)`` pairs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# Hugging Face architecture name -> our family name.
ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
MODEL_TYPES = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _freeze(value: Any) -> Any:
    """Make a JSON value hashable: lists -> tuples, dicts -> sorted item tuples."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _as_tuple_of_ints(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only model (Qwen3, Qwen2 or Llama).

    Attributes:
      family: ``"qwen3"``, ``"qwen2"`` or ``"llama"``.
      vocab_size: V.
      hidden_size: model width D.
      intermediate_size: SwiGLU width F.
      num_layers: L.
      num_heads: query heads Hq.
      num_kv_heads: key/value heads Hkv (Hq is a multiple of Hkv).
      head_dim: per-head width (not always ``hidden_size // num_heads``).
      rms_norm_eps: epsilon inside every RMSNorm.
      rope_theta: RoPE base.
      rope_scaling: ``None`` for plain RoPE, else the scaling parameters as a
        sorted tuple of ``(key, value)`` pairs, always with a ``"rope_type"`` key
        (one of ``linear``, ``dynamic``, ``llama3``, ``yarn``).
      max_position_embeddings: the config's context length.
      tie_word_embeddings: logits use the embedding matrix (no ``lm_head``).
      attention_bias: Llama/Qwen3: bias on q, k, v and o projections. Qwen2 always
        has q/k/v bias and never an o bias, whatever this flag says.
      bos_token_id: or ``None``.
      eos_token_ids: every id that ends a sequence (config and generation config).
      torch_dtype: the checkpoint's dtype name (``"bfloat16"``, ``"float32"``, ...).
      mlp_bias: Llama's ``mlp_bias`` (bias on the three MLP projections).
      hidden_act: the MLP activation; only ``"silu"`` is supported.
      pad_token_id: or ``None``.
      hf_config_json: the source ``config.json`` as a JSON string, kept so a
        saved checkpoint carries the fields we do not model. Excluded from
        equality and hashing.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    mlp_bias: bool = False
    hidden_act: str = "silu"
    pad_token_id: int | None = None
    hf_config_json: str = dataclasses.field(default="", compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.family not in MODEL_TYPES:
            raise ValueError(
                f"unknown model family {self.family!r}; expected one of {tuple(MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise NotImplementedError(
                f"hidden_act {self.hidden_act!r} is not supported (only 'silu')"
            )
        if self.rope_type not in ROPE_TYPES:
            raise NotImplementedError(
                f"rope_type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}"
            )

    # ---- derived, family-specific structure -------------------------------------------------

    @property
    def architecture(self) -> str:
        return FAMILY_ARCHITECTURE[self.family]

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalizes q and k per head (RMSNorm over head_dim) before RoPE."""
        return self.family == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return True if self.family == "qwen2" else self.attention_bias

    @property
    def o_bias(self) -> bool:
        return False if self.family == "qwen2" else self.attention_bias

    @property
    def rope_params(self) -> dict[str, Any]:
        """The RoPE scaling parameters as a dict (``{"rope_type": "default"}`` when unscaled)."""
        return dict(self.rope_scaling) if self.rope_scaling else {"rope_type": "default"}

    @property
    def rope_type(self) -> str:
        return self.rope_params["rope_type"]

    # ---- Hugging Face config.json ---------------------------------------------------------

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
    ) -> ModelConfig:
        """Reads a Hugging Face ``config.json`` dict (transformers 4 or 5 layout).

        Args:
          config: the parsed ``config.json``. RoPE settings come from
            ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``
            (transformers 4).
          generation_config: optional parsed ``generation_config.json``; its
            ``eos_token_id`` ids are added to ``eos_token_ids``.

        Raises:
          ValueError: unknown architecture, or a required field missing.
          NotImplementedError: a feature we do not model (sliding window, other
            activations, other RoPE types).
        """
        archs = tuple(config.get("architectures") or ())
        family = None
        for arch in archs:
            family = ARCHITECTURES.get(arch)
            if family:
                break
        if family is None and not archs:
            family = MODEL_TYPES.get(config.get("model_type", ""))
        if family is None:
            got = archs or (f"model_type={config.get('model_type')!r}",)
            raise ValueError(
                f"unknown architecture {', '.join(map(str, got))}; reset-jax supports "
                f"{', '.join(ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if key not in config or config[key] is None:
                raise ValueError(f"config.json for {family} lacks the required field {key!r}")
            return config[key]

        if config.get("use_sliding_window") and config.get("sliding_window"):
            layer_types = config.get("layer_types") or []
            if not layer_types or "sliding_attention" in layer_types:
                raise NotImplementedError("sliding-window attention layers are not supported")

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = config.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _read_rope(config)

        eos = list(_as_tuple_of_ints(config.get("eos_token_id")))
        if generation_config:
            eos += [
                e for e in _as_tuple_of_ints(generation_config.get("eos_token_id")) if e not in eos
            ]
        torch_dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        return cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", family == "qwen2")),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=tuple(eos),
            torch_dtype=str(torch_dtype),
            mlp_bias=bool(config.get("mlp_bias", False)),
            hidden_act=str(config.get("hidden_act", "silu")),
            pad_token_id=config.get("pad_token_id"),
            hf_config_json=json.dumps(dict(config), sort_keys=True),
        )

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict (transformers 5 layout) that ``from_hf`` and transformers read back.

        Starts from the source ``config.json`` (if any) so unmodelled fields survive.
        """
        out: dict[str, Any] = json.loads(self.hf_config_json) if self.hf_config_json else {}
        out.pop("quantization_config", None)
        out.pop("rope_scaling", None)
        eos: Any = list(self.eos_token_ids)
        if len(eos) == 1:
            eos = eos[0]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope.update(_thaw(self.rope_scaling) if self.rope_scaling else {})
        out.update(
            architectures=[self.architecture],
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos or None,
            torch_dtype=self.torch_dtype,
            hidden_act=self.hidden_act,
            pad_token_id=self.pad_token_id,
        )
        if self.family == "llama":
            out["mlp_bias"] = self.mlp_bias
        return out


def _thaw(frozen: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in frozen}


def _read_rope(config: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """``(rope_theta, frozen scaling params or None)`` from either config layout."""
    params = dict(config.get("rope_parameters") or {})
    # transformers 4 layout; also accepted alongside rope_parameters.
    legacy = dict(config.get("rope_scaling") or {})
    for key, value in legacy.items():
        params.setdefault(key, value)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = config.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    needed = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
        "yarn": ("original_max_position_embeddings",),
    }[rope_type]
    for key in needed:
        if params.get(key) is None:
            raise ValueError(f"rope_type {rope_type!r} needs rope parameter {key!r}")
    params["rope_type"] = rope_type
    return float(theta), _freeze(params)


# ---- RoPE frequencies (host side, static per config) -------------------------------------


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin scale for the config's RoPE variant.

    ``dynamic`` NTK scaling depends on the sequence length and is handled at call
    time (see ``layers.rope_tables``); this returns its unscaled frequencies.

    Returns:
      ``(inv_freq [head_dim // 2] float32, attention_factor)``; the factor
      multiplies both cos and sin (only YaRN uses it).
    """
    dim = config.head_dim
    base = config.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim  # [D/2]
    inv_freq = 1.0 / base**exponents
    p = config.rope_params
    rope_type = p["rope_type"]
    factor_scale = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / p["factor"]
    elif rope_type == "llama3":
        factor = p["factor"]
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are interpolated by `factor`, short ones kept, the
        # band between blended linearly in 1/wavelength.
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif rope_type == "yarn":
        inv_freq, factor_scale = _yarn(config, p, inv_freq)
    return inv_freq.astype(np.float32), float(factor_scale)


def _yarn(config: ModelConfig, p: dict[str, Any], inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
    dim = config.head_dim
    base = config.rope_theta
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or config.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over `orig` positions.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, attention_factor
