"""Flax models against PyTorch transformers on small random configs (CPU, float32)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from reset_jax.models import KVCache, ModelConfig, from_pretrained  # noqa: E402

VOCAB = 256
PROMPT_LEN = 12
NEW_TOKENS = 32

# name -> (transformers classes, config kwargs, save kwargs). Between them: tied and
# untied embeddings, GQA (Hq/Hkv = 2 and 4), head_dim != hidden/heads, every bias
# layout, and the yarn / llama3 / dynamic RoPE variants (their original context
# is short so the scaling acts within the test's 44 positions).
CASES = {
    "qwen3-yarn": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            head_dim=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=16,
            ),
            max_position_embeddings=64,
        ),
        {},
    ),
    "qwen2-tied-sharded": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        dict(max_shard_size="40KB"),
    ),
    "llama-llama3-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        {},
    ),
    "llama-dynamic-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
            max_position_embeddings=24,
        ),
        {},
    ),
}


def _hf_model(name: str, seed: int = 0):
    config_cls, model_cls, kwargs, _ = CASES[name]
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        # Larger than the default 0.02 so logits are O(1) and greedy choices clear-cut.
        initializer_range=0.15,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        torch_dtype="float32",
    )
    base.update(kwargs)
    config = getattr(transformers, config_cls)(**base)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        # Random norm weights, biases too: the defaults (ones, zeros) would hide
        # a missing or misplaced norm or bias.
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@functools.cache
def _saved(name: str, root: str) -> tuple[object, str]:
    model = _hf_model(name)
    path = f"{root}/{name}"
    model.save_pretrained(path, **CASES[name][3])
    return model, path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


def _jitted(model):
    """Uncached logits and a cached step, both taking the parameters as traced arguments."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def full(state, ids):
        return nnx.merge(graphdef, state)(ids)

    @functools.partial(jax.jit, donate_argnums=(3,))
    def step(state, ids, positions, cache):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.forward(ids, positions, cache)
        return m.logits(hidden), cache

    return state, full, step


def _greedy(model, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """A test-only greedy loop over the cached forward: prefill, then one token a step."""
    state, _, step = _jitted(model)
    s = len(prompt)
    cache = model.init_cache(1, s + new_tokens)
    logits, cache = step(
        state, jnp.asarray(prompt[None], jnp.int32), jnp.arange(s, dtype=jnp.int32)[None], cache
    )
    tok = int(jnp.argmax(logits[0, -1]))
    out = [tok]
    for i in range(new_tokens - 1):
        pos = jnp.full((1, 1), s + i, jnp.int32)
        logits, cache = step(state, jnp.full((1, 1), tok, jnp.int32), pos, cache)
        tok = int(jnp.argmax(logits[0, -1]))
        out.append(tok)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_match_transformers(name, root):
    hf, path = _saved(name, root)
    if "sharded" in name:
        assert os.path.isfile(f"{path}/model.safetensors.index.json")
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    model = from_pretrained(path, dtype=jnp.float32)
    assert model.config.family == name.split("-")[0]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (2, 40))  # past every test config's original context
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    state, full, _ = _jitted(model)
    got = np.asarray(full(state, jnp.asarray(ids, jnp.int32)))
    assert got.shape == (2, 40, VOCAB) and got.dtype == np.float32
    scale = np.abs(ref).max()
    assert scale > 1.0
    err = np.abs(got - ref).max()
    assert err <= 1e-4 * scale, f"max abs error {err} at logit scale {scale}"

    prompt = rng.integers(0, VOCAB, PROMPT_LEN)
    with torch.no_grad():
        hf_out = hf.generate(
            torch.tensor(prompt[None]),
            attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    want = hf_out[0, PROMPT_LEN:].tolist()
    assert len(want) == NEW_TOKENS
    assert len(set(want)) > 1  # a constant continuation would prove little
    assert _greedy(model, prompt, NEW_TOKENS) == want


@pytest.mark.parametrize("name", ["qwen3-yarn", "qwen2-tied-sharded"])
def test_cached_decode_equals_uncached_forward(name, root):
    """Two right-padded rows of different lengths: prefill, then one token a step per row."""
    _, path = _saved(name, root)
    model = from_pretrained(path, dtype=jnp.float32)
    state, full, step = _jitted(model)
    rng = np.random.default_rng(2)
    lengths = np.array([7, 12])
    steps = 5
    seqs = rng.integers(0, VOCAB, (2, 12 + steps))  # each row: prompt, then its decoded tokens
    prompt = seqs[:, :12].copy()
    prompt[0, lengths[0] :] = 0  # right padding

    # Each row's real sequence (prompt, then decoded tokens), right-padded to one
    # length: causal logits at position p depend on tokens 0..p only, so one
    # uncached call is the reference for every prefill and decode position.
    rows = np.zeros((2, 12 + steps), np.int64)
    for b, n in enumerate(lengths):
        rows[b, : n + steps] = np.concatenate([seqs[b, :n], seqs[b, n : n + steps]])
    ref = np.asarray(full(state, jnp.asarray(rows, jnp.int32)))  # [2, 12 + steps, V]

    cache = model.init_cache(2, 24)
    assert isinstance(cache, KVCache) and cache.max_len == 24
    assert cache.k.shape == (2, 2, 24, model.config.num_kv_heads, model.config.head_dim)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    logits, cache = step(state, jnp.asarray(prompt, jnp.int32), positions, cache)
    tol = 1e-5 * float(np.abs(ref).max())
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits[b, :n], ref[b, :n], atol=tol, rtol=0)

    for i in range(steps):
        pos = lengths + i  # row 0 overwrites its padding slots as it goes
        toks = rows[[0, 1], pos]
        logits, cache = step(
            state,
            jnp.asarray(toks[:, None], jnp.int32),
            jnp.asarray(pos[:, None], jnp.int32),
            cache,
        )
        for b in range(2):
            np.testing.assert_allclose(logits[b, 0], ref[b, pos[b]], atol=tol, rtol=0)


def test_config_reads_both_rope_layouts():
    base = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        eos_token_id=[2, 3],
    )
    legacy = ModelConfig.from_hf(
        {**base, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
        generation_config={"eos_token_id": [3, 7]},
    )
    new = ModelConfig.from_hf(
        {**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}},
        generation_config={"eos_token_id": [3, 7]},
    )
    assert legacy == new and hash(legacy) == hash(new)
    assert new.rope_theta == 500000.0 and new.rope_params == {"rope_type": "linear", "factor": 2.0}
    assert new.eos_token_ids == (2, 3, 7)
    assert new.num_kv_heads == 4 and new.head_dim == 16 and new.family == "llama"
    plain = ModelConfig.from_hf({**base, "rope_theta": 1e6})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    assert ModelConfig.from_hf(plain.to_hf()) == plain
    with pytest.raises(NotImplementedError, match="longrope"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
