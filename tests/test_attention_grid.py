"""The decode-attention partial kernel's launch rules (`PartialChunkIndices`, `PartialWarps`,
ffi/attention_kernels.h), compiled on the CPU with the host C++ compiler: chunk indices and
warps a CTA for short and long caches."""

import pytest
from conftest import build_host_program

PROGRAM = r"""
#include <cstdio>
#include "attention_kernels.h"
// Lines "g T per_chunk slots chunk_grid" -> PartialChunkIndices, "w B T partial_warps" ->
// PartialWarps.
int main() {
  char op;
  int x, y, z, w;
  while (std::scanf(" %c", &op) == 1) {
    if (op == 'g' && std::scanf("%d %d %d %d", &x, &y, &z, &w) == 4)
      std::printf("%d\n", rjattn::PartialChunkIndices(x, y, z, w));
    else if (op == 'w' && std::scanf("%d %d %d", &x, &y, &z) == 3)
      std::printf("%d\n", rjattn::PartialWarps(x, y, z));
    else
      return 1;
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def chunk_indices(tmp_path_factory):
    program = build_host_program(tmp_path_factory.mktemp("grid"), PROGRAM)

    def run(cases, op="g"):
        text = "".join(op + " " + " ".join(map(str, c)) + "\n" for c in cases)
        return [int(x) for x in program(text).split()]

    return run


def test_partial_grid_rule(chunk_indices):
    # (T, Hkv * B, resident CTAs, chunk_grid) -> chunk indices; 132-SM card: 528 slots of
    # 4-warp CTAs (B = 8), 396 of 8-warp ones (B = 1), Qwen3 8 kv heads.
    cases = {
        (1024, 64, 528, 0): 8,  # B = 8: 16 chunks, a round holds 8 a row
        (640, 8, 396, 0): 10,  # B = 1, short cache: every chunk (the one-chunk kernel)
        (4096, 8, 396, 0): 49,  # B = 1: 64 chunks, a round holds 49
        (32768, 64, 528, 0): 32,  # B = 8, 512 chunks: four whole rounds of 8 (<= 16 passes)
        (32768, 8, 528, 0): 66,  # B = 1 with 4-warp CTAs (PartialWarps' choice for T > 8192)
        (32768, 8, 396, 0): 49,  # 8-warp CTAs (partial_warps = 8): one round keeps 11 passes
        (32768, 16, 396, 0): 48,  # B = 2, 8 warps: two whole rounds of 24, not 32
        (65535 * 64, 512, 528, 0): 4096,  # B = 64: one index a round, 4096 rounds (16 passes)
        (4096, 64, 0, 0): 64,  # occupancy unknown: every chunk
        (4096, 64, 528, 3): 3,  # chunk_grid caps (tests)
        (100, 64, 528, 65535): 2,  # ... at the chunk count
        (64, 4096, 528, 0): 1,  # one chunk
    }
    assert chunk_indices(list(cases)) == list(cases.values())
    # Every chunk index has at least one chunk, no CTA takes more than 16 passes, and a capped
    # grid is whole rounds of resident CTAs.
    for T in (64, 1000, 4096, 8192, 32768, 131072):
        for per_chunk in (1, 8, 16, 64, 512, 1024):
            for slots in (396, 528):
                (z,) = chunk_indices([(T, per_chunk, slots, 0)])
                chunks = -(-T // 64)
                assert 1 <= z <= chunks and -(-chunks // z) <= 16
                if z < chunks:
                    assert z % max(1, slots // per_chunk) == 0


def test_partial_warps_rule(chunk_indices):
    # (B, T, partial_warps) -> warps a partial-kernel CTA: 8 for B <= 2 up to 128 chunks,
    # 4 for larger batches or longer caches; an explicit 4 or 8 wins.
    cases = {
        (1, 640, 0): 8,
        (2, 8192, 0): 8,  # 128 chunks
        (1, 8193, 0): 4,  # 129 chunks: read as a long generation
        (1, 32768, 0): 4,
        (3, 640, 0): 4,
        (8, 32768, 0): 4,
        (8, 640, 8): 8,
        (1, 640, 4): 4,
    }
    assert chunk_indices(list(cases), op="w") == list(cases.values())
