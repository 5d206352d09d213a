"""The evaluation harness and calibration, on a fake model stack; one test on the real one."""

import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from reset_jax import cli
from reset_jax.eval import cli as eval_cli
from reset_jax.eval.calibrate import calibrate, read_entropy_jsonl, write_entropy_jsonl
from reset_jax.eval.datasets import Example, load_jsonl
from reset_jax.eval.harness import (
    RESET_TABLE,
    RunConfig,
    format_markdown,
    parse_configs,
    reset_params_for,
    run_eval,
    summarize,
)
from reset_jax.hub import DEFAULT_MODEL

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k-dev-50.jsonl"


# Probability of a right answer per (weights, sampler) in the fake model.
P_CORRECT = {("bf16", "fixed"): 0.9, ("nvfp4", "fixed"): 0.5, ("nvfp4", "reset"): 0.7}


class FakeTokenizer:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


class FakeBackend:
    """Answers "What is a + b?" correctly with a probability set by the weights and sampler."""

    def __init__(self):
        self.loads = []
        self.calls = []

    def load(self, quantize, activations):
        self.loads.append((quantize, activations))
        return {"weights": quantize or "bf16"}, FakeTokenizer()

    def make_sampler(self, config, tokenizer):
        if config.sampler == "reset":
            return {"kind": "reset", "t_low": config.t_low, "t_high": config.t_high}
        return {"kind": "fixed", "temperature": config.temperature}

    def generate(self, model, tokenizer, prompts, *, max_new_tokens, sampler, top_p, top_k, seed):
        self.calls.append(
            {
                "weights": model["weights"],
                "sampler": sampler["kind"],
                "n": len(prompts),
                "seed": seed,
            }
        )
        p = P_CORRECT[(model["weights"], sampler["kind"])]
        texts, ids, ents, temps = [], [], [], []
        for row, prompt in enumerate(prompts):
            a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
            rng = np.random.default_rng([seed, row, a, b])
            answer = a + b if rng.random() < p else a + b + 1
            n = min(max_new_tokens, 3 + (a % 5))
            texts.append(f"{a} plus {b}.\n\n\\boxed{{{answer}}}")
            ids.append(list(range(n)))
            ents.append(rng.random(n).astype(np.float32))
            if sampler["kind"] == "reset":
                temps.append(np.where(np.arange(n) % 2 == 0, sampler["t_high"], sampler["t_low"]))
            else:
                temps.append(np.full(n, sampler["temperature"]))
        return {
            "texts": texts,
            "token_ids": ids,
            "entropies": ents,
            "temperatures": temps,
            "timing": {"tokens_per_s": 100.0},
        }


def _examples(n=10):
    return [Example(f"q{i}", f"What is {i} + {2 * i}?", str(3 * i)) for i in range(n)]


# --- configurations ------------------------------------------------------------------


def test_reset_params_for_names_and_paths():
    assert reset_params_for("Qwen/Qwen3-8B") == RESET_TABLE["qwen3-8b"]
    assert reset_params_for("/ckpt/qwen3-14b-nvfp4/") == (0.3, 0.4863)
    assert reset_params_for("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B") == (0.4, 0.6446)
    assert reset_params_for("Qwen3-80B") is None
    assert reset_params_for("qwen3-8bx") is None
    assert reset_params_for("smollm2-135m-instruct") is None


def test_parse_configs():
    cfgs = parse_configs("bf16, nvfp4,nvfp4+reset,w4a4+reset", model_name="Qwen/Qwen3-32B")
    assert [c.name for c in cfgs] == ["bf16", "nvfp4", "nvfp4+reset", "w4a4+reset"]
    assert cfgs[0] == RunConfig("bf16", None, "bf16", "fixed", 0.6)
    assert cfgs[1].weights_key == cfgs[2].weights_key == ("nvfp4", "bf16")
    assert (cfgs[2].sampler, cfgs[2].t_low, cfgs[2].tau0) == ("reset", 0.1, 0.5363)
    assert cfgs[3].weights_key == ("nvfp4", "nvfp4")
    # Flags override the table, one at a time.
    c = parse_configs("nvfp4+reset", model_name="Qwen3-32B", tau0=0.3)[0]
    assert (c.t_low, c.tau0) == (0.1, 0.3)
    c = parse_configs(["nvfp4+reset"], model_name="smollm2", t_low=0.2, tau0=0.4, window=16)[0]
    assert (c.t_low, c.tau0, c.window) == (0.2, 0.4, 16)
    with pytest.raises(ValueError, match="pass --t-low and --tau0"):
        parse_configs("nvfp4+reset", model_name="smollm2-135m-instruct", t_low=0.2)
    with pytest.raises(ValueError, match="unknown configuration 'fp8'"):
        parse_configs("fp8")
    with pytest.raises(ValueError, match="unknown configuration 'nvfp4\\+greedy'"):
        parse_configs("nvfp4+greedy")
    with pytest.raises(ValueError, match="repeat"):
        parse_configs("bf16,bf16")
    with pytest.raises(ValueError, match="no configurations"):
        parse_configs(" , ")


# --- summary --------------------------------------------------------------------------


def _rec(config, seed, i, correct):
    return {
        "config": config,
        "seed": seed,
        "id": f"q{i}",
        "correct": correct,
        "n_tokens": 10 + i,
        "truncated": i == 0,
        "mean_entropy": 0.5,
        "share_t_high": None,
    }


def test_summarize_t_interval_and_single_seed():
    cfgs = [
        RunConfig("a", None, "bf16", "fixed", 0.6),
        RunConfig("b", "nvfp4", "bf16", "fixed", 0.6),
    ]
    recs = []
    for seed, n_right in enumerate([2, 3, 4]):  # per-seed accuracy 0.5, 0.75, 1.0
        recs += [_rec("a", seed, i, i < n_right) for i in range(4)]
    recs += [_rec("b", 0, i, i < 1) for i in range(4)]
    s = summarize(recs, cfgs, timings={"a": [10.0, 30.0, 20.0]})
    a, b = s["configs"]
    assert a["accuracy_per_seed"] == [0.5, 0.75, 1.0]
    assert a["accuracy_mean"] == pytest.approx(0.75)
    assert a["accuracy_std"] == pytest.approx(0.25)
    half = 4.302652729911275 * 0.25 / math.sqrt(3)  # t_{0.975, 2 dof}
    assert a["ci95"] == pytest.approx([0.75 - half, 0.75 + half])
    assert "3 seeds" in a["ci95_method"]
    assert a["mean_tokens"] == pytest.approx(11.5) and a["truncated_share"] == pytest.approx(0.25)
    assert a["tokens_per_s"] == 20.0 and a["share_t_high"] is None
    assert b["ci95"] is None and b["ci95_method"] == "n/a (1 seed)" and b["accuracy_mean"] == 0.25
    # No "nvfp4" here, so the first configuration is the baseline; only seed 0 is shared.
    assert s["paired"] == [
        {"config": "b", "baseline": "a", "seeds": 1, "delta_mean": -0.25, "ci95": None}
    ]
    md = format_markdown(s)
    assert "- b vs a: -25.0 points (no CI with 1 seed; paired over 1 seed)" in md
    assert "| a | 75.0 |" in md and "n/a (1 seed)" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 3  # header + two rows


# --- run_eval -------------------------------------------------------------------------


def test_run_eval_side_by_side(tmp_path):
    backend = FakeBackend()
    cfgs = parse_configs("bf16,nvfp4,nvfp4+reset", t_low=0.2, tau0=0.5)
    exs = _examples(10)
    out = tmp_path / "run"
    res = run_eval(
        exs,
        cfgs,
        backend=backend,
        seeds=3,
        batch_size=4,
        max_new_tokens=5,
        out_dir=out,
        progress=False,
        settings={"model": "fake"},
    )

    assert len(res.records) == 3 * 3 * 10
    # One load per weight format; nvfp4 and nvfp4+reset share the model.
    assert backend.loads == [(None, "bf16"), ("nvfp4", "bf16")]
    # Every call is a full batch (the last one padded), 3 batches per (config, seed).
    assert all(c["n"] == 4 for c in backend.calls) and len(backend.calls) == 3 * 3 * 3
    # Paired seeds: every configuration sees the same per-batch seeds.
    seeds_by_sampler = {}
    for c in backend.calls:
        seeds_by_sampler.setdefault((c["weights"], c["sampler"]), []).append(c["seed"])
    assert len({tuple(v) for v in seeds_by_sampler.values()}) == 1

    r = res.records[0]
    assert set(r) == {
        "config",
        "seed",
        "id",
        "prediction",
        "extracted",
        "gold",
        "correct",
        "n_tokens",
        "truncated",
        "mean_entropy",
        "share_t_high",
    }
    assert (r["config"], r["seed"], r["id"]) == ("bf16", 0, "q0")
    assert all(rec["correct"] == (rec["extracted"] == rec["gold"]) for rec in res.records)
    assert all(rec["n_tokens"] <= 5 for rec in res.records)
    assert any(rec["truncated"] for rec in res.records)
    reset = [rec for rec in res.records if rec["config"] == "nvfp4+reset"]
    assert all(0.4 <= rec["share_t_high"] <= 0.7 for rec in reset)
    assert all(rec["share_t_high"] is None for rec in res.records if rec["config"] == "bf16")

    on_disk = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(json.dumps(x, sort_keys=True) for x in on_disk) == sorted(
        json.dumps(x, sort_keys=True) for x in res.records
    )
    summary = json.loads((out / "summary.json").read_text())
    accs = {c["config"]: c["accuracy_mean"] for c in summary["configs"]}
    paired = {d["config"]: d for d in summary["paired"]}
    assert set(paired) == {"bf16", "nvfp4+reset"} and paired["bf16"]["baseline"] == "nvfp4"
    assert paired["bf16"]["delta_mean"] == pytest.approx(accs["bf16"] - accs["nvfp4"])
    lo, hi = paired["bf16"]["ci95"]
    assert lo <= paired["bf16"]["delta_mean"] <= hi
    assert accs["bf16"] > accs["nvfp4"]  # the fake's probabilities: 0.9 vs 0.5
    assert summary["settings"]["seeds"] == [0, 1, 2] and summary["settings"]["model"] == "fake"
    assert (out / "summary.md").read_text() == res.markdown
    assert json.loads((out / "run.json").read_text())["settings"]["max_new_tokens"] == 5


def test_run_eval_resume_and_guards(tmp_path):
    cfgs = parse_configs("nvfp4,nvfp4+reset", t_low=0.2, tau0=0.5)
    exs = _examples(6)
    out = tmp_path / "run"
    first = FakeBackend()
    full = run_eval(
        exs,
        cfgs,
        backend=first,
        seeds=2,
        batch_size=3,
        max_new_tokens=8,
        out_dir=out,
        progress=False,
    )
    lines = (out / "samples.jsonl").read_text().splitlines()
    # Simulate an interrupted run: keep the first 5 samples only.
    (out / "samples.jsonl").write_text("\n".join(lines[:5]) + "\n")

    with pytest.raises(FileExistsError, match="resume"):
        run_eval(
            exs,
            cfgs,
            backend=FakeBackend(),
            seeds=2,
            batch_size=3,
            max_new_tokens=8,
            out_dir=out,
            progress=False,
        )
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_eval(
            exs,
            cfgs,
            backend=FakeBackend(),
            seeds=2,
            batch_size=3,
            max_new_tokens=9,
            out_dir=out,
            resume=True,
            progress=False,
        )

    other = parse_configs("nvfp4,nvfp4+reset", t_low=0.2, tau0=0.6)
    with pytest.raises(ValueError, match=r"differ in \['nvfp4\+reset'\]"):
        run_eval(
            exs,
            other,
            backend=FakeBackend(),
            seeds=2,
            batch_size=3,
            max_new_tokens=8,
            out_dir=out,
            resume=True,
            progress=False,
        )

    again = FakeBackend()
    resumed = run_eval(
        exs,
        cfgs,
        backend=again,
        seeds=2,
        batch_size=3,
        max_new_tokens=8,
        out_dir=out,
        resume=True,
        progress=True,
    )
    # Only the unfinished batches ran: 8 batches in all, 1 complete before.
    assert len(again.calls) == len(first.calls) - 1
    assert resumed.records == full.records
    assert resumed.summary["configs"] == [
        dict(c, tokens_per_s=c["tokens_per_s"]) for c in full.summary["configs"]
    ]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 2 * 6


def test_run_eval_argument_errors():
    cfgs = parse_configs("bf16")
    with pytest.raises(ValueError, match="seed"):
        run_eval(_examples(2), cfgs, backend=FakeBackend(), seeds=[], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(_examples(2), cfgs, backend=FakeBackend(), batch_size=0, progress=False)


def test_mc_examples_are_scored_by_letter(tmp_path):
    class MCBackend(FakeBackend):
        def generate(self, model, tokenizer, prompts, **kw):
            n = len(prompts)
            return {
                "texts": ["Thinking.\n\nThe answer is (B)."] * n,
                "token_ids": [[1, 2]] * n,
                "entropies": [np.zeros(2)] * n,
                "temperatures": [np.full(2, 0.6)] * n,
                "timing": None,
            }

    exs = [Example("m1", "Q?", "B", ("x", "y", "z")), Example("m2", "Q?", "C", ("x", "y", "z"))]
    res = run_eval(
        exs, parse_configs("bf16"), backend=MCBackend(), seeds=1, batch_size=2, progress=False
    )
    assert [r["correct"] for r in res.records] == [True, False]
    assert res.summary["configs"][0]["tokens_per_s"] is None


# --- calibration and the CLI ------------------------------------------------------------


def test_calibrate_with_fake_backend(tmp_path):
    backend = FakeBackend()
    res = calibrate(_examples(8), backend=backend, n=5, max_new_tokens=6, batch_size=2)
    assert backend.loads == [("nvfp4", "bf16")] and len(res.records) == 5
    assert [c["n"] for c in backend.calls] == [2, 2, 1]
    pooled = np.concatenate([r["entropies"] for r in res.records])
    assert res.n_tokens == pooled.size
    assert res.tau0 == pytest.approx(np.percentile(pooled, 80), rel=1e-6)
    assert res.percentiles[80] == pytest.approx(res.tau0, rel=1e-6)
    assert list(res.percentiles) == [10, 25, 50, 75, 80, 90, 95, 99]
    r = res.records[0]
    assert r["config"] == "nvfp4" and r["tokens"][:2] == ["<0>", "<1>"]
    assert len(r["token_ids"]) == len(r["entropies"]) == len(r["temperatures"])
    write_entropy_jsonl(tmp_path / "d" / "e.jsonl", res.records)
    assert read_entropy_jsonl(tmp_path / "d" / "e.jsonl") == res.records


def test_cli_eval_and_calibrate(tmp_path, monkeypatch, capsys):
    backend = FakeBackend()
    monkeypatch.setattr(eval_cli, "make_backend", lambda args: backend)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": e.id, "question": e.question, "answer": e.answer}) + "\n"
            for e in _examples(7)
        )
    )
    out = tmp_path / "out"
    rc = eval_cli.main(
        [
            "eval",
            "--data",
            str(data),
            "--configs",
            "bf16,nvfp4+reset",
            "--t-low",
            "0.3",
            "--tau0",
            "0.45",
            "--seeds",
            "2",
            "--limit",
            "5",
            "--offset",
            "1",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| bf16 |" in printed and "| nvfp4+reset |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["n_examples"] == 5 and summary["settings"]["seeds"] == [0, 1]
    assert summary["settings"]["command"].startswith("reset-jax eval --data")
    # --dtype auto is recorded as what it meant here, so a resume elsewhere cannot mix dtypes.
    assert summary["settings"]["dtype"] == np.dtype(cli.resolve_dtype("auto")).name
    reset = summary["configs"][1]["spec"]
    assert (reset["t_low"], reset["tau0"], reset["sampler"]) == (0.3, 0.45, "reset")
    ids = {json.loads(x)["id"] for x in (out / "samples.jsonl").read_text().splitlines()}
    assert ids == {"q1", "q2", "q3", "q4", "q5"}

    with pytest.raises(SystemExit, match="--t-low and --tau0"):
        eval_cli.main(["eval", "--data", str(data), "--configs", "nvfp4+reset", "--out", str(out)])

    dump = tmp_path / "ent.jsonl"
    rc = eval_cli.main(
        [
            "calibrate",
            "--data",
            str(data),
            "--n",
            "3",
            "--max-new-tokens",
            "6",
            "--quantize",
            "none",
            "--out",
            str(dump),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tau0 = " in printed and "--tau0 " in printed
    assert [r["config"] for r in read_entropy_jsonl(dump)] == ["bf16"] * 3
    assert backend.loads[-1] == (None, "bf16")


def test_register_adds_subcommands():
    import argparse

    parser = argparse.ArgumentParser(prog="reset-jax")
    sub = parser.add_subparsers(dest="command")
    eval_cli.register(sub)
    args = parser.parse_args(["eval", "--data", "x.jsonl", "--out", "o"])
    assert args.func is not None and args.configs == "bf16,nvfp4,nvfp4+reset"
    assert (args.temperature, args.top_p, args.seeds, args.model) == (
        0.6,
        0.95,
        3,
        "smollm2-135m-instruct",
    )
    args = parser.parse_args(["calibrate", "--data", "x.jsonl"])
    assert (args.n, args.quantize, args.percentile) == (5, "nvfp4", 80.0)
    args = parser.parse_args(["entropy-plot", "--bf16", "a", "--nvfp4", "b", "-o", "f.png"])
    assert args.output == "f.png"


def _model_flags(parser, command):
    """``{option: (default, choices, help)}`` of a subcommand's model flags."""
    sub = parser._subparsers._group_actions[0].choices[command]  # argparse keeps them here
    names = ("--model", "--dtype", "--activations", "--implementation", "--fuse")
    return {
        a.option_strings[0]: (a.default, a.choices, a.help)
        for a in sub._actions
        if a.option_strings and a.option_strings[0] in names
    }


def test_eval_commands_take_generate_model_flags():

    parser = cli.build_parser()
    gen = _model_flags(parser, "generate")
    assert set(gen) == {"--model", "--dtype", "--activations", "--implementation", "--fuse"}
    assert gen["--dtype"][0] == "auto" and gen["--model"][0] == DEFAULT_MODEL
    # The same flags, defaults, choices and help (eval's configurations name
    # their own activation format, so eval has no --activations).
    assert _model_flags(parser, "calibrate") == gen
    assert _model_flags(parser, "eval") == {k: v for k, v in gen.items() if k != "--activations"}
    args = parser.parse_args(["eval", "--data", "x.jsonl", "--out", "o"])
    assert (args.dtype, args.implementation) == ("auto", None)
    # "auto" reaches the model stack as a concrete dtype (float32 on CPU, bfloat16 on GPU).
    auto = np.dtype(cli.resolve_dtype("auto")).name
    assert eval_cli.make_backend(args).dtype == auto
    args = parser.parse_args(["calibrate", "--data", "x.jsonl", "--dtype", "float16"])
    assert eval_cli.make_backend(args).dtype == "float16" and args.activations == "bf16"
    assert eval_cli.make_backend(args).fuse == "auto"  # --fuse reaches the loaded models
    args = parser.parse_args(["eval", "--data", "x.jsonl", "--out", "o", "--fuse", "attention"])
    assert eval_cli.make_backend(args).fuse == "attention"
    with pytest.raises(ValueError, match="--fuse 'fast'"):
        cli.apply_fuse(None, "fast")


def test_results_md_accuracy_commands_still_parse():
    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md").read_text()
    lines = text.replace("\\\n", " ").splitlines()
    commands = [shlex.split(ln.partition("#")[0]) for ln in lines if ln.startswith("reset-jax ")]
    commands = [c[1:] for c in commands if c[1] in ("calibrate", "entropy-plot", "eval")]
    assert {"calibrate", "eval"} <= {c[0] for c in commands}, commands
    parser = cli.build_parser()
    previous = {}
    for argv in commands:
        if "..." in argv:  # "the command above, and ..."
            i = argv.index("...")
            argv = argv[:i] + previous[argv[0]][1:] + argv[i + 1 :]
        previous[argv[0]] = argv
        assert parser.parse_args(argv).func is not None, argv


# --- the real default model, tiny budgets ----------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K.exists(), reason="shared/data not beside the repository")
def test_real_model_eval_and_calibrate(tmp_path):
    # One NVFP4 model serves calibration and both evaluated configurations; the
    # fixed-temperature decode loop compiled for calibration is reused by "nvfp4".
    from reset_jax.eval.harness import JaxBackend
    from reset_jax.eval.plots import plot_entropy_distributions

    exs = load_jsonl(GSM8K, limit=2)
    backend = JaxBackend(dtype="float32")
    cal = calibrate(exs, backend=backend, n=2, max_new_tokens=8)
    assert cal.n_tokens > 0 and np.isfinite(cal.tau0) and cal.tau0 >= 0
    assert all(len(r["entropies"]) == len(r["token_ids"]) <= 8 for r in cal.records)
    assert all(
        r["config"] == "nvfp4" and len(r["tokens"]) == len(r["token_ids"]) for r in cal.records
    )
    write_entropy_jsonl(tmp_path / "nvfp4.jsonl", cal.records)
    pooled = np.concatenate([r["entropies"] for r in read_entropy_jsonl(tmp_path / "nvfp4.jsonl")])
    plot_entropy_distributions({"NVFP4": pooled}, tmp_path / "fig.png", tau0=cal.tau0)

    cfgs = parse_configs("nvfp4,nvfp4+reset", t_low=0.1, tau0=cal.tau0)
    res = run_eval(
        exs,
        cfgs,
        backend=backend,
        seeds=1,
        batch_size=2,
        max_new_tokens=8,
        out_dir=tmp_path / "run",
        progress=False,
    )
    assert len(res.records) == 4
    for r in res.records:
        assert 0 < r["n_tokens"] <= 8 and np.isfinite(r["mean_entropy"])
        assert isinstance(r["prediction"], str)
    shares = [r["share_t_high"] for r in res.records if r["config"] == "nvfp4+reset"]
    assert all(0.0 <= s <= 1.0 for s in shares)
    assert (tmp_path / "run" / "summary.md").exists()
    assert backend._last[0] == ("nvfp4", "bf16")
