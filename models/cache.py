"""The key/value cache: two stacked arrays, one slot per position, written in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys and values of every layer, indexed by absolute position.

    A token at position ``p`` of row ``b`` is stored at ``[:, b, p]``. Nothing
    records how much of a row is valid: a query at position ``p`` attends to
    slots ``0..p`` of its own row, so a slot holding padding is only ever read
    after a real token has overwritten it. Pass the cache as a donated argument
    of the jitted step so XLA updates it in place.

    Attributes:
      k: ``[L, B, T, Hkv, D]`` keys after RoPE, in the model dtype.
      v: ``[L, B, T, Hkv, D]`` values.
    """

    k: jax.Array  # [L, B, T, Hkv, D]
    v: jax.Array  # [L, B, T, Hkv, D]

    @property
    def max_len(self) -> int:
        """T, the number of positions the cache can hold."""
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        """B, the number of rows."""
        return self.k.shape[1]

    @classmethod
    def zeros(
        cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype
    ) -> KVCache:
        """An empty cache of shape ``[num_layers, batch, max_len, num_kv_heads, head_dim]``."""
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
