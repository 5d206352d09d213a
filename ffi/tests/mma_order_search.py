"""Search for cheap decodes of NVFP4 code words into bf16x2 MMA operands (dev tool).

The wide GEMV turns each 32-bit word of 8 E2M1 codes into four bf16x2 registers whose
set bits may only be {6, 7, 8, 15, 22, 23, 24, 31} (sign, exponent LSBs and mantissa MSB
of two bf16 values; `DecodeMmaOrderx8` in ffi/nvfp4_kernels.cuh). The MMA word order is
a free permutation of the word's bits, so a decode is cheap when every output is one of:

* the word itself, masked (1 instruction);
* the word rotated by r, masked (2: SHF + LOP3);
* the word masked to 8 bits, multiplied by a sum of powers of two, masked (3: LOP3 +
  IMAD + LOP3), valid when no two copies share a bit position (no carries) and each
  masked bit has exactly one copy on the output mask.

This script lists every combination of one plain mask, two rotates and one multiply of
up to three terms that covers all 32 bits exactly once: 8 instructions a word. Four
outputs of the first two forms alone (7 instructions) would need the mask to tile the
word by rotations; the script checks that none does.

Usage: python ffi/tests/mma_order_search.py
"""

from __future__ import annotations

import itertools

MASK = frozenset((6, 7, 8, 15, 22, 23, 24, 31))


def rotated_sources(r: int) -> frozenset[int]:
    """Word bits that a left rotate by r moves onto the mask."""
    return frozenset((p - r) % 32 for p in MASK)


def multiply_fits(bits: frozenset[int], shifts: tuple[int, ...]) -> bool:
    """Whether (word & bits) * sum(2**s) puts each bit on the mask once, carry-free."""
    landed: dict[int, int] = {}
    for b in bits:
        for s in shifts:
            if b + s < 32:
                if b + s in landed:
                    return False  # two copies share a position: carries
                landed[b + s] = b
    on_mask = {pos: b for pos, b in landed.items() if pos in MASK}
    return set(on_mask) == MASK and len(set(on_mask.values())) == 8


def main() -> None:
    tilings = [
        rs
        for rs in itertools.combinations(range(1, 32), 3)
        if len(MASK.union(*(rotated_sources(r) for r in rs))) == 32
    ]
    print(f"mask + three rotates covering the word (7 instructions): {len(tilings)}")
    found = 0
    for r1, r2 in itertools.combinations(range(1, 32), 2):
        a, b = rotated_sources(r1), rotated_sources(r2)
        if MASK & a or MASK & b or a & b:
            continue
        rest = frozenset(range(32)) - MASK - a - b
        for k in (1, 2, 3):
            for shifts in itertools.combinations(range(32), k):
                if multiply_fits(rest, shifts):
                    found += 1
                    pre = sum(1 << i for i in rest)
                    mul = sum(1 << s for s in shifts)
                    print(f"rotates {r1}, {r2}; (q & {pre:#010x}) * {mul} (shifts {shifts})")
    print(f"8-instruction decodes: {found}")


if __name__ == "__main__":
    main()
