"""What each kernel does after its PDL wait, read from a ``cuobjdump -sass`` listing.

A chained kernel (``ffi/pdl.cuh``) issues its first loads, then waits on
``griddepcontrol.wait`` (``ACQBULK`` in SASS) for the kernel before it. Everything between
that wait and the first load after it sits on the layer's critical path. ptxas sinks index
arithmetic past the wait when nothing before the wait consumes it, and an empty ``asm
volatile`` does not pin it. The attention combine had ~375 instructions there, two integer
divisions among them (RESULTS.md run Y2). This script counts, per kernel:

* ``to_load``: instructions from the wait to the first global or shared load after it
  (``None`` when no load follows);
* ``divisions``: integer-division sequences after the wait (each starts with a conversion
  rounding toward +inf: ``I2F.RP``, ``I2F.U32.RP``, ``I2F.U64.RP`` or their uniform-datapath
  ``UI2F`` forms), and ``divisions_before_load`` of them before that first load.

A kernel can branch after the wait, so the first load in the listing's order may sit on a
path that a given launch does not take; read the SASS around a large count before acting on
it.

Usage::

  nvcc -std=c++17 -O3 -arch=sm_90 -cubin -I ffi ffi/attention_kernels.cu -o attn.cubin
  cuobjdump -sass attn.cubin > attn.sass
  python benchmarks/sass_after_wait.py attn.sass [--min 50]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["AfterWait", "main", "scan"]

_FUNCTION = re.compile(r"Function : (\S+)")
# One SASS instruction: /*0090*/  [@P0] OPCODE operands ;
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)")
_LOAD = re.compile(r"^(LDG|LDS|LD|LDGSTS)(\.|$)")
_DIVISION = re.compile(r"^U?I2F(\.[US](32|64))?\.RP(\.|$)")


@dataclass(frozen=True)
class AfterWait:
    """One kernel's work after its first ``griddepcontrol.wait``.

    Attributes:
      kernel: the mangled kernel name, as cuobjdump prints it.
      to_load: instructions between the wait and the first load after it; ``None`` when no
        load follows the wait.
      first_load: that load's opcode (``LDG.E.128``, ...), or ``None``.
      divisions: integer-division sequences (``I2F[.U32|.U64].RP``, ``UI2F...``) anywhere after
        the wait.
      divisions_before_load: those of them before the first load.
    """

    kernel: str
    to_load: int | None
    first_load: str | None
    divisions: int
    divisions_before_load: int


def scan(lines: Iterable[str]) -> list[AfterWait]:
    """Scans a ``cuobjdump -sass`` listing.

    Args:
      lines: the listing's lines.

    Returns:
      One :class:`AfterWait` per kernel that contains ``ACQBULK``, in listing order; kernels
      without a PDL wait are left out.
    """
    # (kernel, its opcodes in listing order), one entry a listed function: a name can repeat
    # where an executable embeds several cubins.
    functions: list[tuple[str, list[str]]] = []
    for line in lines:
        m = _FUNCTION.search(line)
        if m:
            functions.append((m.group(1), []))
        elif functions and (m := _INSTRUCTION.search(line)):
            functions[-1][1].append(m.group(1))
    return [_after_wait(k, ops) for k, ops in functions if "ACQBULK" in ops]


def _after_wait(kernel: str, ops: list[str]) -> AfterWait:
    """The :class:`AfterWait` of one kernel's opcodes (which contain ``ACQBULK``)."""
    after = [op for op in ops[ops.index("ACQBULK") + 1 :] if op != "ACQBULK"]
    load = next((i for i, op in enumerate(after) if _LOAD.match(op)), None)
    divisions = [i for i, op in enumerate(after) if _DIVISION.match(op)]
    return AfterWait(
        kernel,
        load,
        None if load is None else after[load],
        len(divisions),
        sum(load is None or i < load for i in divisions),
    )


def _short(name: str) -> str:
    """The kernel's template name without the namespace prefix (best effort)."""
    m = re.search(r"\d+((?:Attn|Gemv|Wide|AddRms|SwiGlu)\w*)", name)
    return m.group(1) if m else name


def main(argv: Sequence[str] | None = None) -> int:
    """Prints one line per kernel: instructions to the first load, divisions, the name."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sass", help="a cuobjdump -sass listing ('-' for standard input)")
    p.add_argument(
        "--min",
        type=int,
        default=0,
        help="only kernels with at least this many instructions to the load (kernels with no "
        "load after the wait are always listed)",
    )
    args = p.parse_args(argv)
    with open(args.sass) if args.sass != "-" else sys.stdin as f:
        rows = scan(f)
    print(f"{'to load':>7} {'div':>4} {'(before)':>8}  first load       kernel")
    for r in rows:
        if r.to_load is not None and r.to_load < args.min:
            continue
        n = "-" if r.to_load is None else str(r.to_load)
        print(
            f"{n:>7} {r.divisions:4d} {r.divisions_before_load:8d}  {r.first_load or '-':16s} {_short(r.kernel)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
