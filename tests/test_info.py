"""python -m scm_fast.info, and the package without its compiled extension."""
import subprocess
import sys


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_info_lists_every_op_and_its_backend():
    out = subprocess.run([sys.executable, "-m", "scm_fast.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for op in ("attention_fwd", "attention_fwd_jvp", "attention_bwd"):
        assert op in out.stdout
    assert "torch" in out.stdout and "triton" in out.stdout


def test_without_extension_reference_path_works_and_warns():
    code = """
import sys, warnings
sys.modules["scm_fast._C"] = None  # as in a source checkout that was never built
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from scm_fast.ops import attention, attention_ref
print("WARN:", [str(w.message) for w in caught])
q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
t = tuple(torch.randn_like(x) for x in (q, k, v))
o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, causal=True), (q, k, v), t)
ro, rto = torch.func.jvp(lambda q, k, v: attention_ref(q, k, v, causal=True), (q, k, v), t)
torch.testing.assert_close(o, ro)
torch.testing.assert_close(to, rto)
print("OK")
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    assert "scm_fast._C is not built" in out.stdout and "pip install -e . --no-build-isolation" in out.stdout
