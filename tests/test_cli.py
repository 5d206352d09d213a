"""The ``reset-jax`` CLI: a fast in-process run on a tiny checkpoint saved by
transformers, clear errors, and (slow) the README's main command, as written, on the default model."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

from reset_jax import cli

WORDS = ["<unk>", "<eos>", "the", "cat", "sat", "on", "a", "mat", "\n", "\n\n", ".", "dog"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random Llama and a word-level tokenizer with a chat template, as a HF directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<eos>", unk_token="<unk>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_generate_on_a_tiny_checkpoint(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "the cat sat", "--prompt", "a dog"]
    argv += ["--max-new-tokens", "6", "--t-low", "0.2", "--tau0", "2.0", "--seed", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "=== [0] the cat sat" in out and "=== [1] a dog" in out
    assert "tokens/s" in out
    account = out.strip().splitlines()[-1]
    assert account.startswith("ReSET: ") and "at T_low=0.2" in account and "mean entropy" in account
    # The loop's host check every step instead of every 8: the same tokens.
    assert cli.main([*argv, "--sync-every", "1"]) == 0
    assert capsys.readouterr().out.split("---")[0] == out.split("---")[0]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--sync-every", "0"])
    assert "--sync-every: must be >= 1, got 0" in capsys.readouterr().err


def test_fuse_flag_keeps_the_tokens(tiny_dir, capsys):
    """``--fuse all`` (on the CPU: the same compositions) generates the same greedy text."""
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "the cat sat", "--quantize", "nvfp4",
            "--dtype", "float32", "--sampler", "greedy", "--max-new-tokens", "5"]  # fmt: skip
    assert cli.main([*argv, "--fuse", "none"]) == 0  # the default, auto, fuses on a GPU
    plain = capsys.readouterr().out
    assert cli.main([*argv, "--fuse", "all"]) == 0
    captured = capsys.readouterr()
    assert "fused add + norm into 2 layers" in captured.err
    assert "one-call decode attention in 2 layers (CUDA where" in captured.err

    def text(out):  # the generated text, without the timing and summary lines
        skip = ("ReSET", "greedy")
        return [ln for ln in out.splitlines() if not ln.startswith(skip) and "tokens/s" not in ln]

    assert text(plain) == text(captured.out) and text(plain)
    # --fuse layers: the chained decode path, which on the CPU runs the per-layer path
    assert cli.main([*argv, "--fuse", "layers"]) == 0
    captured = capsys.readouterr()
    assert "decode steps through all 2 layers in one custom call" in captured.err
    assert text(plain) == text(captured.out)


def test_fuse_auto(tiny_dir, capsys):
    """``--fuse auto`` (the default) is ``layers`` on a GPU unless Pallas or XLA is asked
    for, and ``none`` on the CPU."""
    assert cli.build_parser().parse_args(["generate", "--prompt", "x"]).fuse == "auto"
    assert cli.resolve_fuse("auto", None, "gpu") == "layers"
    assert cli.resolve_fuse("auto", "cuda", "gpu") == "layers"
    assert cli.resolve_fuse("auto", "pallas", "gpu") == "none"
    assert cli.resolve_fuse("auto", "xla", "gpu") == "none"
    assert cli.resolve_fuse("auto", None, "cpu") == "none"
    assert cli.resolve_fuse("attention", None, "cpu") == "attention"
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "the cat sat", "--quantize", "nvfp4",
            "--dtype", "float32", "--sampler", "greedy", "--max-new-tokens", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    if jax.default_backend() == "gpu":
        assert "--fuse auto: layers" in err and "decode steps through all 2 layers" in err
    else:
        assert "--fuse auto: none" in err and "fused add + norm" not in err


def test_errors_are_one_line(tiny_dir, capsys):
    assert cli.main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown model name" in err and "smollm2-135m-instruct" in err
    assert "Traceback" not in err
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "the cat sat on a mat"]
    assert cli.main([*argv, "--max-cache-len", "4", "--sampler", "greedy"]) == 2
    assert "6 tokens" in capsys.readouterr().err


def test_help_and_subcommands():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    assert {"generate", "quantize"} <= set(commands)
    out = subprocess.run(
        [sys.executable, "-m", "reset_jax.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--sampler {reset,fixed,greedy}" in out and "smollm2-135m-instruct" in out


def _readme_main_command() -> list[str]:
    """The `reset-jax ...` part of the README's first set-up command, as argv."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("pip install -e . && reset-jax")]
    argv = shlex.split(line.split("&&", 1)[1])
    assert argv[:2] == ["reset-jax", "generate"], argv
    return argv[1:]


@pytest.mark.slow
def test_readme_command_on_the_default_model():
    # Exactly the README's main job (NVFP4 through the XLA backend on CPU).
    proc = subprocess.run(
        [sys.executable, "-m", "reset_jax.cli", *_readme_main_command()],
        capture_output=True,
        text=True,
        timeout=1200,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text, _, stats = proc.stdout.partition("\n---\n")
    assert len(text.split()) >= 3, proc.stdout
    assert "tokens/s" in stats and "ReSET: " in stats


def test_quantize_writes_a_loadable_nvfp4_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "nvfp4"
    # quantize writes the weights as loaded: it has no --fuse (no decode fusions to apply)
    assert "fuse" not in vars(cli.build_parser().parse_args(["quantize", "a", "b"]))
    assert cli.main(["quantize", str(tiny_dir), str(out), "--dtype", "float32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "NVFP4"
    assert (out / "tokenizer.json").is_file()
    from reset_jax.models import NVFP4Param, from_pretrained

    model = from_pretrained(out)
    assert nnx.state(model, NVFP4Param)  # the linear layers came back quantized


def test_cli_adds_command_buffer_flags_unless_the_user_set_them(monkeypatch):
    from reset_jax import cli

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    cli._default_xla_flags()
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {cli.GPU_XLA_FLAGS}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")
    cli._default_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer=FUSION"
