"""Every attention kernel config compiles for sm_80 and sm_90 (bf16), without a GPU; the report's
occupancy and pass/fail rules.

Compiling takes about 2 s a config on one core: the default run compiles the default (first) config
of each list for both targets; the full sweeps are marked slow (.ci/run runs the whole report, which
also fails on an undocumented spill).
"""
import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_report.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kernel_report = _load_script()


def _check(rows, defaults_only, arch):
    expected = sum(len(kernel_report.configs(kind, block_d, "bf16", arch)[:1 if defaults_only else None])
                   for kind in kernel_report.KINDS for block_d in (64, 128, 256))
    assert len(rows) == expected
    for row in rows:
        assert "error" not in row, row
        assert row["regs"] > 0, row
        if row["kernel"] not in kernel_report.NO_DOT:  # sm_90: wgmma, or mma where a tile is too small
            assert row["tc"] != "-", row


@pytest.mark.slow  # CI runs `make report`, which compiles every shipped config for both
@pytest.mark.parametrize("arch", [80, 90])
def test_default_configs_compile(arch):
    _check(kernel_report.report(dtypes=("bf16",), archs=(arch,), defaults_only=True), True, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_all_configs_compile(arch):
    _check(kernel_report.report(dtypes=("bf16",), archs=(arch,)), False, arch)


def test_occupancy():
    # 255 registers round to 256 a thread: 8 warps take 65536, the whole register file of an SM
    assert kernel_report.occupancy(255, 8, 1000, 90) == dict(blocks_per_sm=1, warps_per_sm=8, occupancy_limit="regs")
    # 128 registers, 4 warps: 4 blocks by registers, 2 by 80 KiB of shared memory on an A100
    occ = kernel_report.occupancy(128, 4, 80 * 1024, 80)
    assert occ == dict(blocks_per_sm=2, warps_per_sm=8, occupancy_limit="smem")
    assert kernel_report.occupancy(24, 4, 0, 80)["occupancy_limit"] == "warps"  # 16 blocks of 4 warps


def _row(**kw):
    return dict(dict(kernel="jvp", target="sm_80", dtype="bf16", block_d=128, block_m=128, block_n=16,
                     num_warps=8, num_stages=2, regs=200, spill=0, smem=1, smem_ok=True, tc="mma",
                     blocks_per_sm=1, warps_per_sm=8, occupancy_limit="regs", time=1.0), **kw)


def test_failures_name_undocumented_spills_only():
    ok, spill, documented = _row(), _row(spill=8), _row(spill=8, block_d=256)
    no_tc, big, broken = _row(tc="-"), _row(smem=300000, smem_ok=False), dict(_row(), error="X: y")
    fails = kernel_report.failures([ok, spill, documented, no_tc, big, broken])
    assert [r for r, _ in fails] == [spill, no_tc, big, broken]
    assert "spills 8 bytes" in fails[0][1] and "shared memory" in fails[2][1]
    assert kernel_report.spill_exception(documented) and not kernel_report.spill_exception(spill)
