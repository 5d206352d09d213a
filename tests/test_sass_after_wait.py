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


# Three kernels in cuobjdump's layout: one with index math and a division between its wait
# and its first load, one without a PDL wait (left out), one whose wait is followed by no load.
LISTING = """
	code for sm_90
		Function : _ZN6rjattn17AttnCombineKernelILi128ELi1EEEvNS_19DecodeAttentionArgsE
	.headerflags	@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0080*/                   LDG.E R2, desc[UR6][R2.64] ;           /* 0x0000000602027981 */
        /*0090*/                   ACQBULK ;                              /* 0x000000000000782e */
        /*00a0*/                   IABS R9, R10 ;                         /* 0x0000000a00097213 */
        /*00b0*/                   I2F.RP R0, R9 ;                        /* 0x0000000900007306 */
        /*00c0*/                   MUFU.RCP R0, R0 ;                      /* 0x0000000000007308 */
        /*00d0*/               @!P4 LDG.E.STRONG.GPU R94, desc[UR6][R74.64+0x200] ;
        /*00e0*/                   I2F.RP R3, R4 ;                        /* 0x0000000400037306 */
        /*00f0*/                   EXIT ;                                 /* 0x000000000000794d */
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
"""


def test_scan_counts_the_work_between_the_wait_and_the_first_load():
    rows = _tool().scan(LISTING.splitlines())
    assert [r.kernel for r in rows] == [
        "_ZN6rjattn17AttnCombineKernelILi128ELi1EEEvNS_19DecodeAttentionArgsE",
        "_ZN5nvfp414WideGemvKernelILi1ELi2ELi8ELb1EEEvNS_7KParamsE",
    ]
    combine, wide = rows
    # IABS, I2F.RP, MUFU.RCP, then the predicated load: the load before the wait is not counted.
    assert combine.to_load == 3
    assert combine.first_load == "LDG.E.STRONG.GPU"
    assert combine.divisions == 2 and combine.divisions_before_load == 1
    assert wide.to_load is None and wide.first_load is None
    assert wide.divisions == 0


def test_main_filters_by_count(tmp_path, capsys):
    path = tmp_path / "k.sass"
    path.write_text(LISTING)
    assert _tool().main([str(path), "--min", "2"]) == 0
    out = capsys.readouterr().out
    assert "AttnCombineKernel" in out and "WideGemvKernel" not in out
