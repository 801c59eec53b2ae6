"""benchmarks/harness.py on trivial functions: check before timing, the records' fields, quantile order.

No assertion on timing values (the machine is shared); only on their order and presence.
"""
import importlib.util
import json
import math
import pathlib
import sys
import textwrap

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"


def _load():
    spec = importlib.util.spec_from_file_location("harness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("harness", module)
    spec.loader.exec_module(module)
    return module


harness = _load()


class Counting:
    """A trivial case: fn returns x * 2 (or a wrong value), counting its calls and the timer's."""

    def __init__(self, wrong=False):
        self.x = torch.arange(8.0)
        self.wrong, self.calls, self.timed = wrong, 0, 0

    def fn(self):
        self.calls += 1
        return (self.x * 2 + (1.0 if self.wrong else 0.0),)

    def check(self, out):
        return harness.check_close(out, (self.x * 2,), 1e-4, ["y"], label="double", reference="x * 2")

    def timer(self, fn, first_call_s):
        assert first_call_s >= 0
        self.timed += 1
        return harness.time_loop(fn, reps=5, warmup=1)


def test_wrong_result_fails_and_is_not_timed():
    case = Counting(wrong=True)
    record = harness.run_case("double", {"n": 8}, case.fn, case.check, case.timer)
    assert record.check.status == "fail" and not record.check.ok
    assert case.calls == 1 and case.timed == 0  # only the checked call: no warm-up, no timing
    assert record.timing is None and record.median is None
    # bound = tol x max(1, max |exact|) = 1e-4 x 14
    assert record.check.message == "MISMATCH: double y: max error 1.000e+00 > 1.400e-03 vs x * 2"
    d = record.as_dict()
    assert d["check"]["status"] == "fail" and d["median_s"] is None and d["quantiles_s"] is None


def test_right_result_passes_then_is_timed():
    case = Counting()
    record = harness.run_case("double", {"n": 8}, case.fn, case.check, case.timer)
    assert record.check.status == "pass" and record.check.errors == {"y": 0.0}
    assert case.timed == 1 and case.calls == 1 + 1 + 5  # checked call, warm-up, 5 timed
    t = record.timing
    assert t.samples == t.reps == len(t.times) == 5
    q = t.quantiles
    assert set(q) == {"p20", "p50", "p80"}
    assert min(t.times) <= q["p20"] <= q["p50"] <= q["p80"] <= max(t.times)
    assert q["p50"] == pytest.approx(t.median)


def test_quantiles_of_known_samples():
    t = harness.Timing.from_times([5.0, 1.0, 4.0, 2.0, 3.0])
    assert t.median == 3.0 and t.quantiles == {"p20": 1.8, "p50": 3.0, "p80": 4.2}
    assert harness.Timing.from_times([7.0]).quantiles == {"p20": 7.0, "p50": 7.0, "p80": 7.0}


def test_check_close_bound_nan_and_zip():
    # bound scales with max |exact| above 1; numbers work as well as tensors
    assert harness.check_close([100.05], [100.0], 1e-3).ok
    assert not harness.check_close([100.2], [100.0], 1e-3).ok
    assert not harness.check_close([torch.tensor([math.nan])], [torch.tensor([0.0])], 1e-3).ok
    # pairs as zip(names, got, want): extra outputs beyond the names are not checked
    c = harness.check_close([torch.ones(2), torch.zeros(2)], [torch.ones(2), torch.ones(2)], 1e-4, ["a"])
    assert c.ok and list(c.errors) == ["a"]


def test_records_json_fields(tmp_path):
    records = harness.Records(str(tmp_path / "out"), "toy")
    good = Counting()
    records.add(harness.run_case("good", {"shape": [8]}, good.fn, good.check, good.timer,
                                 memory=harness.PeakMemory("cpu", cpu="malloc")))
    bad = Counting(wrong=True)
    records.add(harness.run_case("bad", {"shape": [8]}, bad.fn, bad.check, bad.timer))
    records.items[0].metrics["flop"] = 8  # filled in after add: serialised at write
    path = records.write({"device": "cpu"})
    assert path == str(tmp_path / "out" / "toy.records.json")
    data = json.loads(pathlib.Path(path).read_text())
    assert data["benchmark"] == "toy" and data["environment"] == {"device": "cpu"}
    first, second = data["records"]
    for r in (first, second):
        assert {"name", "config", "check", "median_s", "quantiles_s", "peak_extra_bytes",
                "memory_method", "metrics"} <= set(r)
    assert first["name"] == "good" and first["config"] == {"shape": [8]} and first["check"]["status"] == "pass"
    assert first["quantiles_s"]["p20"] <= first["median_s"] <= first["quantiles_s"]["p80"]
    assert isinstance(first["peak_extra_bytes"], int) and first["memory_method"] == "mallinfo2_in_use"
    assert first["metrics"] == {"flop": 8}
    assert second["check"]["status"] == "fail" and second["median_s"] is None


@pytest.mark.skipif(not pathlib.Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_memory_rss_is_bytes():
    mem = harness.PeakMemory("cpu", cpu="rss").begin()
    buf = bytearray(4 * harness.MiB)  # noqa: F841
    extra = mem.end()
    assert isinstance(extra, int) and mem.method == "vmhwm_minus_vmrss"


def test_abort_writes_the_failing_record(tmp_path):
    records = harness.Records(str(tmp_path), "toy")
    bad = Counting(wrong=True)
    record = records.add(harness.run_case("bad", {}, bad.fn, bad.check, bad.timer))
    with pytest.raises(SystemExit) as exc:
        records.abort(record.check.message)
    assert str(exc.value).startswith("MISMATCH: double y")
    data = json.loads((tmp_path / "toy.records.json").read_text())
    assert data["records"][0]["check"]["status"] == "fail"


def test_run_worker_keeps_the_record_of_a_failed_worker(tmp_path):
    # a worker that does what harness.reply does on a failed check (plain Python: no torch import)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        spec = json.loads(sys.argv[2])
        print(json.dumps({"record": {"name": spec["name"], "check": {"status": spec["status"]}}, "x": 1}))
        if spec["status"] == "fail":
            sys.exit("MISMATCH: toy")
    """))
    records = harness.Records(str(tmp_path), "toy")
    assert harness.run_worker(str(script), {"name": "a", "status": "pass"}, "a", records, {"flop": 3}) == {"x": 1}
    with pytest.raises(SystemExit) as exc:
        harness.run_worker(str(script), {"name": "b", "status": "fail"}, "b", records)
    assert str(exc.value) == "b failed:\nMISMATCH: toy"
    data = json.loads((tmp_path / "toy.records.json").read_text())
    assert [r["name"] for r in data["records"]] == ["a", "b"]
    assert data["records"][0]["metrics"] == {"flop": 3} and data["records"][1]["check"]["status"] == "fail"


def test_reply_prints_the_record_and_exits_on_failure(capsys):
    bad = Counting(wrong=True)
    record = harness.run_case("bad", {}, bad.fn, bad.check, bad.timer)
    with pytest.raises(SystemExit):
        harness.reply(record, {})
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["record"]["check"]["status"] == "fail"


def test_time_do_bench_without_a_gpu(monkeypatch):
    # Triton's do_bench faked: "all" gives every sample in ms; an older Triton only the quantiles
    triton_testing = pytest.importorskip("triton.testing")
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, return_mode="mean", quantiles=None: [3.0, 1.0, 2.0])
    t = harness.time_do_bench(lambda: None)
    assert t.samples == 3 and t.median == pytest.approx(2e-3) and t.reps is None
    assert t.quantiles["p20"] <= t.quantiles["p50"] <= t.quantiles["p80"]

    def old_do_bench(fn, return_mode="mean", quantiles=None):
        assert return_mode in ("min", "max", "mean", "median")
        return [1.0, 2.0, 4.0] if quantiles is not None else 2.0
    monkeypatch.setattr(triton_testing, "do_bench", old_do_bench)
    t = harness.time_do_bench(lambda: None)
    assert t.median == pytest.approx(2e-3) and t.quantiles == pytest.approx({"p20": 1e-3, "p50": 2e-3, "p80": 4e-3})
