"""The decode-attention partial kernel's grid rule (`PartialChunkIndices`, ffi/attention_kernels.h),
compiled on the CPU with the host C++ compiler: chunk indices for short and long caches."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_INCLUDE = Path("/usr/local/cuda/include")

PROGRAM = r"""
#include <cstdio>
#include "attention_kernels.h"
int main() {
  int T, per_chunk, slots, chunk_grid;
  while (std::scanf("%d %d %d %d", &T, &per_chunk, &slots, &chunk_grid) == 4)
    std::printf("%d\n", rjattn::PartialChunkIndices(T, per_chunk, slots, chunk_grid));
  return 0;
}
"""


@pytest.fixture(scope="module")
def chunk_indices(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or not (CUDA_INCLUDE / "cuda_runtime_api.h").exists():
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    d = tmp_path_factory.mktemp("grid")
    (d / "grid.cc").write_text(PROGRAM)
    exe = d / "grid"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'ffi'}", f"-I{CUDA_INCLUDE}",
                    str(d / "grid.cc"), "-o", str(exe)], check=True)  # fmt: skip

    def run(cases):
        text = "".join(" ".join(map(str, c)) + "\n" for c in cases)
        out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
        return [int(x) for x in out.stdout.split()]

    return run


def test_partial_grid_rule(chunk_indices):
    # (T, Hkv * B, resident CTAs, chunk_grid) -> chunk indices; 132-SM card: 528 slots of
    # 4-warp CTAs (B = 8), 396 of 8-warp ones (B = 1), Qwen3 8 kv heads.
    cases = {
        (1024, 64, 528, 0): 8,  # B = 8: 16 chunks, a round holds 8 a row
        (640, 8, 396, 0): 10,  # B = 1, short cache: every chunk (the one-chunk kernel)
        (4096, 8, 396, 0): 49,  # B = 1: 64 chunks, a round holds 49
        (32768, 64, 528, 0): 32,  # 512 chunks: the floor, at most 16 passes a CTA
        (32768, 8, 396, 0): 49,  # B = 1: one round (49) already keeps passes <= 16 (11)
        (65535 * 64, 512, 528, 0): 4096,  # B = 64: the floor binds, not the round (1)
        (4096, 64, 0, 0): 64,  # occupancy unknown: every chunk
        (4096, 64, 528, 3): 3,  # chunk_grid caps (tests)
        (100, 64, 528, 65535): 2,  # ... at the chunk count
        (64, 4096, 528, 0): 1,  # one chunk
    }
    assert chunk_indices(list(cases)) == list(cases.values())
    # Every chunk index has at least one chunk, and no CTA takes more than 16 passes.
    for T in (64, 1000, 4096, 8192, 32768, 131072):
        for per_chunk in (1, 8, 64, 512):
            (z,) = chunk_indices([(T, per_chunk, 528, 0)])
            chunks = -(-T // 64)
            assert 1 <= z <= chunks and -(-chunks // z) <= 16
