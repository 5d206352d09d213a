"""Entropy summaries, figures, step boundaries, and the entropy-plot command."""

import json

import numpy as np
import pytest

from reset_jax.eval import cli as eval_cli
from reset_jax.eval.calibrate import read_entropy_jsonl
from reset_jax.eval.plots import (
    entropy_summary,
    format_summaries,
    plot_entropy_distributions,
    plot_token_trace,
    step_starts,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_entropy_summary_numbers():
    e = np.array([0.0, 0.005, 0.05, 0.2, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    s = entropy_summary(e)
    assert s["n"] == 10 and s["mean"] == pytest.approx(e.mean())
    assert s["p50"] == pytest.approx(np.percentile(e, 50))
    assert s["p80"] == pytest.approx(np.percentile(e, 80))
    assert s["share_low"] == pytest.approx(0.3)  # 0, 0.005, 0.05 are below 0.1
    assert s["share_below_0.01"] == pytest.approx(0.2)
    assert entropy_summary(e, low=1.0)["share_low"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="empty"):
        entropy_summary(np.zeros(0))


def test_plot_entropy_distributions_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    bf16 = rng.exponential(0.6, 2000)
    nvfp4 = np.concatenate([np.zeros(300), rng.exponential(0.4, 1700)])  # exact zeros too
    path = tmp_path / "sub" / "fig.png"
    fig, summaries = plot_entropy_distributions({"BF16": bf16, "NVFP4": nvfp4}, path, tau0=0.5)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    assert summaries["NVFP4"]["share_low"] > summaries["BF16"]["share_low"]
    assert len(fig.axes) == 4
    text = format_summaries(summaries)
    assert "share H < 0.1" in text and "BF16" in text and "NVFP4" in text
    with pytest.raises(ValueError, match="no series"):
        plot_entropy_distributions({})


@pytest.mark.parametrize(
    "ids, starts",
    [
        ([5, 10, 6, 7], [2]),  # after a "\n\n" token
        ([5, 1, 1, 6, 7], [3]),  # after two "\n" tokens
        ([5, 1, 6, 1, 7], []),  # single newlines never split
        ([1, 1, 1, 6], [2, 3]),  # three newlines: both ends of the second pair
        ([10], []),  # nothing after the boundary token
        ([], []),
    ],
)
def test_step_starts(ids, starts):
    assert step_starts(ids, nl_ids=[1], dnl_ids=[10, 11]) == starts


def test_plot_token_trace(tmp_path):
    h = np.abs(np.sin(np.arange(40) / 3.0))
    t = np.where(h > 0.5, 1.0, 0.1)
    fig = plot_token_trace(h, t, starts=[10, 25], tau0=0.5, path=tmp_path / "trace.png", title="x")
    assert (tmp_path / "trace.png").read_bytes().startswith(PNG_MAGIC)
    assert len(fig.axes) == 2  # entropy and the temperature twin axis
    with pytest.raises(ValueError, match="differ in length"):
        plot_token_trace(h, t[:-1])


def test_entropy_plot_command(tmp_path, capsys):
    rng = np.random.default_rng(1)

    def dump(path, ids, scale):
        with open(path, "w") as f:
            for i in ids:
                f.write(json.dumps({"id": i, "entropies": list(rng.exponential(scale, 50))}) + "\n")

    dump(tmp_path / "a.jsonl", ["p1", "p2", "p3"], 0.6)
    dump(tmp_path / "b.jsonl", ["p1", "p2"], 0.3)
    out = tmp_path / "fig.png"
    rc = eval_cli.main(
        [
            "entropy-plot",
            "--bf16",
            str(tmp_path / "a.jsonl"),
            "--nvfp4",
            str(tmp_path / "b.jsonl"),
            "-o",
            str(out),
            "--summary-json",
            str(tmp_path / "s.json"),
        ]
    )
    assert rc == 0 and out.read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert "keeping the 2 problems common" in printed and "mean (nats)" in printed
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["BF16"]["n"] == summary["NVFP4"]["n"] == 100

    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "zz", "entropies": [0.1]}) + "\n")
    with pytest.raises(SystemExit, match="share no problem id"):
        eval_cli.main(
            [
                "entropy-plot",
                "--bf16",
                str(tmp_path / "a.jsonl"),
                "--nvfp4",
                str(tmp_path / "c.jsonl"),
                "-o",
                str(out),
            ]
        )
    with pytest.raises(SystemExit, match="give --bf16"):
        eval_cli.main(["entropy-plot", "-o", str(out)])


def test_read_entropy_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "entropies": [0.1]}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_entropy_jsonl(p)
