"""The decode benchmark runs end to end on the CPU (toy shape), so it does not rot between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decode_benchmark_tiny(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--models", "tiny",
           "--variants", "bf16,xla-w4a16,xla-w4a16-qall", "--batch", "1",
           "--samplers", "reset", "--also-fixed", "xla-w4a16", "--prompt-len", "8",
           "--new-tokens", "6", "--repeats", "1", "--json", str(out)]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    records = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"bf16", "xla-w4a16", "xla-w4a16-qall"}
    for r in records.values():
        assert "error" not in r, r.get("error")
        for x in r["results"]:
            assert x["steps"] == 5 and x["decode_ms_per_token"] > 0 and x["tokens_per_s"] > 0
    # The fixed-temperature rows exist only where asked for.
    samplers = {(x["batch"], x["sampler"]) for x in records["xla-w4a16"]["results"]}
    assert samplers == {(1, "reset"), (1, "fixed")}
    # NVFP4 weights are smaller, and more so with the lm_head and embedding quantized too.
    wb = {v: r["weight_bytes"] for v, r in records.items()}
    assert wb["xla-w4a16-qall"] < wb["xla-w4a16"] < wb["bf16"]
    assert "| tiny | xla-w4a16 | 1 | reset |" in res.stdout
    assert "ReSET overhead tiny/xla-w4a16/B=1" in res.stdout
