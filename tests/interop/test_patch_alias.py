"""scm_fast.patch, the deprecated alias of scm_fast.interop: it warns on import and gives the same
objects; the package itself does not import it."""
import importlib
import subprocess
import sys

import pytest

import scm_fast
import scm_fast.interop as interop

NAMES = ["DoubleNormContinuous", "DoubleNormGroup", "DoubleNormZero", "SDPAPatch", "SwapReport", "patch_sdpa",
         "sdpa_patched", "swap_adaptive_norm", "unpatch_sdpa"]


def test_import_warns_and_gives_the_same_objects(monkeypatch):
    monkeypatch.delitem(sys.modules, "scm_fast.patch", raising=False)  # a fresh import, so that it warns
    with pytest.warns(DeprecationWarning, match="scm_fast.patch moved to scm_fast.interop"):
        patch_mod = importlib.import_module("scm_fast.patch")
    for name in NAMES:
        assert getattr(patch_mod, name) is getattr(interop, name), name
    assert sorted(patch_mod.__all__) == sorted(n for n in NAMES if not n.startswith("DoubleNorm"))
    assert patch_mod.patch_sdpa is scm_fast.patch_sdpa and patch_mod.swap_adaptive_norm is scm_fast.swap_adaptive_norm


def test_interop_exports_and_the_package_does_not_import_the_alias():
    assert sorted(interop.__all__) == sorted(NAMES)
    code = "import sys, scm_fast, scm_fast.nn; assert 'scm_fast.patch' not in sys.modules"
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], check=True)
