"""benchmarks/sass_after_wait.py on hand-written cuobjdump listings (no CUDA needed)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "sass_after_wait", ROOT / "benchmarks" / "sass_after_wait.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


# Four kernels in cuobjdump's layout:
# * a combine with index math between its wait and its first load: a constant load (LDC), a
#   plain conversion (I2FP) and a load-like non-load (LDGDEPBAR) that must not count as loads
#   or divisions, a signed division under a uniform predicate, then the load; after the load,
#   an unsigned and a uniform-datapath division;
# * a GEMV without a PDL wait (left out);
# * a wide GEMV whose wait is followed by no load (only a store);
# * a kernel whose first load after the wait is a shared-memory one (LDS.U.128).
LISTING = """
	code for sm_90
		Function : _ZN6rjattn17AttnCombineKernelILi128ELi4ELi1EEEvNS_19DecodeAttentionArgsE
	.headerflags	@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0080*/                   LDG.E R2, desc[UR6][R2.64] ;           /* 0x0000000602027981 */
        /*0090*/                   ACQBULK ;                              /* 0x000000000000782e */
        /*00a0*/                   LDC.64 R12, c[0x0][0x278] ;            /* 0x00009e00ff0c7b82 */
        /*00b0*/                   I2FP.F32.S32 R5, R6 ;                  /* 0x0000000600057245 */
        /*00c0*/                   LDGDEPBAR ;                            /* 0x00000000000079af */
        /*00d0*/              @!UPT I2F.RP R0, R9 ;                       /* 0x0000000900007306 */
        /*00e0*/               @UP0 MUFU.RCP R0, R0 ;                     /* 0x0000000000007308 */
        /*00f0*/               @!P4 LDG.E.STRONG.GPU R94, desc[UR6][R74.64+0x200] ;
        /*0100*/                   I2F.U32.RP R3, R4 ;                    /* 0x0000000400037306 */
        /*0110*/                   UI2F.RP UR4, UR5 ;                     /* 0x0000000500047306 */
        /*0120*/                   EXIT ;                                 /* 0x000000000000794d */
		..........
		Function : _ZN5nvfp410GemvKernelILi16ELi1ELi2ELi16ELb1EEEvNS_7KParamsE
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   EXIT ;
		Function : _ZN5nvfp414WideGemvKernelILi1ELi2ELi8ELb1EEEvNS_7KParamsE
        /*0000*/                   ACQBULK ;
        /*0010*/                   IMAD R1, R2, R3, RZ ;
        /*0020*/                   STG.E [R4.64], R1 ;
        /*0030*/                   EXIT ;
		Function : _ZN5nvfp414WideGemvKernelILi1ELi2ELi16ELb1EEEvNS_7KParamsE
        /*0000*/                   ACQBULK ;
        /*0010*/                   IADD3 R1, R2, 0x10, RZ ;
        /*0020*/                   LDS.U.128 R4, [R1] ;
        /*0030*/                   EXIT ;
"""


def test_scan_counts_the_work_between_the_wait_and_the_first_load():
    rows = _tool().scan(LISTING.splitlines())
    assert [r.kernel for r in rows] == [
        "_ZN6rjattn17AttnCombineKernelILi128ELi4ELi1EEEvNS_19DecodeAttentionArgsE",
        "_ZN5nvfp414WideGemvKernelILi1ELi2ELi8ELb1EEEvNS_7KParamsE",
        "_ZN5nvfp414WideGemvKernelILi1ELi2ELi16ELb1EEEvNS_7KParamsE",
    ]
    combine, no_load, shared = rows
    # LDC, I2FP, LDGDEPBAR, I2F.RP, MUFU.RCP, then the predicated load; the load before the
    # wait is not counted.
    assert combine.to_load == 5
    assert combine.first_load == "LDG.E.STRONG.GPU"
    # I2F.RP before the load, I2F.U32.RP and UI2F.RP after it; I2FP is no division.
    assert combine.divisions == 3 and combine.divisions_before_load == 1
    assert no_load.to_load is None and no_load.first_load is None
    assert no_load.divisions == 0
    assert shared.to_load == 1 and shared.first_load == "LDS.U.128"


def test_main_filters_by_count(tmp_path, capsys):
    path = tmp_path / "k.sass"
    path.write_text(LISTING)
    assert _tool().main([str(path), "--min", "5"]) == 0
    out = capsys.readouterr().out
    # 5 instructions meet --min 5, 1 does not; a kernel with no load after its wait is listed.
    assert "AttnCombineKernel" in out
    assert "ILi1ELi2ELi16E" not in out
    assert "ILi1ELi2ELi8E" in out
    assert _tool().main([str(path), "--min", "6"]) == 0
    assert "AttnCombineKernel" not in capsys.readouterr().out
