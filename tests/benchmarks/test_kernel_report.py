"""Every attention kernel config compiles for sm_80 and sm_90 (bf16), without a GPU.

Compiling takes about 2 s a config on one core: the default run compiles every config for sm_90 and
the default (first) config of each list for sm_80; the full sm_80 sweep is marked slow.
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


def _check(rows, defaults_only):
    expected = sum(len(kernel_report.configs(kind, block_d, "bf16")[:1 if defaults_only else None])
                   for kind in kernel_report.KINDS for block_d in (64, 128, 256))
    assert len(rows) == expected
    for row in rows:
        assert "error" not in row, row
        assert row["regs"] > 0, row
        if row["kernel"] not in kernel_report.NO_DOT:  # sm_90: wgmma, or mma where a tile is too small
            assert row["tc"] != "-", row


def test_sm90_all_configs_compile():
    _check(kernel_report.report(dtypes=("bf16",), archs=(90,)), defaults_only=False)


def test_sm80_default_configs_compile():
    _check(kernel_report.report(dtypes=("bf16",), archs=(80,), defaults_only=True), defaults_only=True)


@pytest.mark.slow
def test_sm80_all_configs_compile():
    _check(kernel_report.report(dtypes=("bf16",), archs=(80,)), defaults_only=False)
