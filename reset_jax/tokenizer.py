"""Tokenizer loading for Hugging Face directories, GGUF files and model names."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

__all__ = ["load_tokenizer"]


def load_tokenizer(
    path_or_name: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> Any:
    """Load the `transformers` tokenizer of a checkpoint.

    A Hugging Face directory loads with `AutoTokenizer.from_pretrained`; a
    ``.gguf`` file loads the tokenizer embedded in it (vocabulary, merges,
    special tokens and chat template) through `transformers`' GGUF support; a
    model name is first resolved with `reset_jax.hub.resolve`. Tokenizers are
    cached per resolved path, since converting a GGUF vocabulary takes seconds.

    Args:
      path_or_name: a checkpoint directory, a ``.gguf`` file, or a known name.
      cache_dir: passed to `reset_jax.hub.resolve` for names.

    Returns:
      A `transformers` tokenizer (``PreTrainedTokenizerBase``).

    Raises:
      reset_jax.hub.HubError: the name or path does not resolve.
      ValueError: the path is neither a directory nor a ``.gguf`` file.
    """
    from reset_jax import hub

    path = hub.resolve(path_or_name, cache_dir=cache_dir).resolve()
    return _load(str(path))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> Any:
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_dir():
        return AutoTokenizer.from_pretrained(p)
    if p.suffix == ".gguf":
        # GGUF vocabularies are BPE, whose text must come back unchanged: some transformers
        # versions convert them with clean_up_tokenization_spaces=True and then ignore it
        # with a warning on every load; asking for False gives the same text everywhere.
        return AutoTokenizer.from_pretrained(
            p.parent, gguf_file=p.name, clean_up_tokenization_spaces=False
        )
    raise ValueError(f"{path}: expected a checkpoint directory or a .gguf file")
