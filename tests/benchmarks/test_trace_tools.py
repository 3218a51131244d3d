"""The profile readers in benchmarks/ on a small hand-made trace of two GPUs."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import trace_kernels  # noqa: E402

# (start us, duration us, kernel) per GPU; "all-reduce" kernels are the collectives
KERNELS = {
    0: [
        (0, 10, "fusion_1"),
        (10, 4, "all-reduce.1"),
        (30, 10, "fusion_2"),
        (40, 4, "all-reduce.2"),
    ],
    1: [
        (0, 20, "fusion_1"),
        (22, 4, "all-reduce.1"),
        (28, 10, "fusion_2"),
        (50, 4, "all-reduce.2"),
    ],
}


@pytest.fixture
def two_gpu_trace(tmp_path):
    events = []
    for gpu, kernels in KERNELS.items():
        pid = 10 + gpu
        events.append(
            dict(ph="M", name="process_name", pid=pid, args=dict(name=f"/device:GPU:{gpu}"))
        )
        events.append(dict(ph="M", name="thread_name", pid=pid, tid=1, args=dict(name="Stream #1")))
        events += [dict(ph="X", pid=pid, tid=1, ts=ts, dur=dur, name=n) for ts, dur, n in kernels]
    events.append(dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")))
    path = tmp_path / "two.trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    return str(path)


def test_collectives_are_paired_across_gpus(two_gpu_trace):
    trace, names = trace_kernels.load(two_gpu_trace, None)
    assert trace_kernels.trace_gpus(trace) == [0, 1]
    per = {d: trace_kernels.events(trace, names, d) for d in (0, 1)}
    a = trace_kernels.collective_alignment(per)
    assert a["n"] == 2 and a["counts"] == {0: 2, 1: 2}
    g0, g1 = a["per_device"][0], a["per_device"][1]
    # GPU 1 reaches the first all-reduce 12 us after GPU 0 and the second 10 us after it
    assert g1["late"] == pytest.approx(22.0) and g0["late"] == 0.0
    # GPU 0 idles 16 us after its first all-reduce (14 -> 30); GPU 1 2 us (26 -> 28)
    assert g0["gap_after"] == pytest.approx(16.0) and g1["gap_after"] == pytest.approx(2.0)
    assert g1["gap_before"] == pytest.approx(2.0 + 12.0)  # 20 -> 22, 38 -> 50
    assert g0["collective"] == g1["collective"] == pytest.approx(8.0)
    assert g0["busy"] == pytest.approx(28.0) and g0["idle"] == pytest.approx(16.0)


def test_collectives_mode_needs_several_gpus(tmp_path, two_gpu_trace):
    one = tmp_path / "one.trace.json.gz"
    with gzip.open(two_gpu_trace, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    with gzip.open(one, "wt") as fh:
        json.dump({"traceEvents": [e for e in events if e.get("pid") != 11]}, fh)
    with pytest.raises(SystemExit, match="several GPUs"):
        trace_kernels.print_collectives(str(one), None)
