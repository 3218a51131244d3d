"""Read a profiled program kernel by kernel: the launches on one GPU in time order, each with
the idle gap before it, its duration, component and source scope.

  python benchmarks/trace_kernels.py DIR/_decode_impl_0.trace.json.gz [--hlo DIR/...hlo.txt]
      [--device 0] [--skip-us 0] [--window-us 600] [--summary] [--collectives]

The trace and HLO are what `bench_80b.py --hlo-dir DIR` keeps of each profiled program.
--skip-us / --window-us pick a slice of the timeline (from the first kernel); --summary
prints, per kernel name, launches, total and median time, and the gaps that precede it.
--collectives (a trace of several GPUs): the n-th collective of every GPU side by side, to
tell idle time spent waiting for a peer (one GPU starts the collective later than the other)
from idle time both GPUs spend after it.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import _device_events, classify, hlo_op_names, trace_gpus  # noqa: E402


def load(trace_path: str, hlo_path: str | None):
    """(the parsed trace, {HLO op: source scope} from the HLO text, or {})."""
    with gzip.open(trace_path) as fh:
        trace = json.load(fh)
    names = {}
    if hlo_path:
        with open(hlo_path) as fh:
            names = hlo_op_names(fh.read())
    return trace, names


def events(trace, names: dict[str, str], device: int):
    """One GPU's kernels in time order: (ts, dur, name, component, scope)."""
    out = []
    for name, args, dur, ts in _device_events(trace, device):
        op = args.get("hlo_op", "")
        scope = names.get(op) or names.get(name) or ""
        out.append((ts, dur, name, classify(name, op or None, names), scope))
    out.sort()
    return out


def collective_alignment(per_device: dict[int, list]) -> dict:
    """per_device: {gpu: events as `events` returns them}. The n-th collective kernel of each
    GPU is taken as the same collective (SPMD programs issue them in one order). Returns, per
    GPU, us summed over the collectives: `gap_before` and `gap_after` (idle time on that GPU
    just before / after its collective kernel), `collective` (kernel time), `late` (how much
    later than the earliest GPU it started the collective: what the others waited for), and
    `idle` (every gap on the GPU) and `busy`; plus `n` collectives paired and `counts` per GPU
    (unequal counts mean the pairing is off; only the first min(counts) are paired)."""

    def with_gaps(evs):
        out, prev_end = [], None
        for i, (ts, dur, _name, comp, _scope) in enumerate(evs):
            before = 0.0 if prev_end is None else max(0.0, ts - prev_end)
            out.append((ts, dur, comp, before, i))
            prev_end = ts + dur if prev_end is None else max(prev_end, ts + dur)
        return out

    gapped = {d: with_gaps(evs) for d, evs in per_device.items()}
    colls = {d: [x for x in g if x[2] == "collectives"] for d, g in gapped.items()}
    counts = {d: len(c) for d, c in colls.items()}
    n = min(counts.values()) if counts else 0
    res = {
        d: dict(gap_before=0.0, gap_after=0.0, collective=0.0, late=0.0, idle=0.0, busy=0.0)
        for d in per_device
    }
    for d, g in gapped.items():
        res[d]["idle"] = sum(x[3] for x in g)
        res[d]["busy"] = sum(x[1] for x in g)
    for k in range(n):
        first = min(colls[d][k][0] for d in colls)
        for d in colls:
            ts, dur, _, before, i = colls[d][k]
            g = gapped[d]
            after = g[i + 1][3] if i + 1 < len(g) else 0.0
            r = res[d]
            r["gap_before"] += before
            r["gap_after"] += after
            r["collective"] += dur
            r["late"] += ts - first
    return dict(per_device=res, n=n, counts=counts)


def print_collectives(trace_path: str, hlo_path: str | None) -> None:
    trace, names = load(trace_path, hlo_path)
    devices = trace_gpus(trace)
    if len(devices) < 2:
        sys.exit(f"--collectives needs a trace of several GPUs; {trace_path} has {devices}")
    a = collective_alignment({d: events(trace, names, d) for d in devices})
    if len(set(a["counts"].values())) > 1:
        print(f"collective kernels per GPU differ: {a['counts']}; pairing the first {a['n']}")
    print(f"{a['n']} collectives paired across GPUs {devices}; us summed over the trace:")
    print(
        f"{'gpu':>4} {'busy':>9} {'idle':>9} {'collective':>11} {'late':>9} "
        f"{'gap before':>11} {'gap after':>10}"
    )
    for d, r in a["per_device"].items():
        print(
            f"{d:>4} {r['busy']:9.1f} {r['idle']:9.1f} {r['collective']:11.1f} "
            f"{r['late']:9.1f} {r['gap_before']:11.1f} {r['gap_after']:10.1f}"
        )
    print(
        "late: how much later than the first GPU this GPU reached each collective (the others "
        "waited that long, inside the collective kernel or in the gap after it)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--hlo", default=None)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--skip-us", type=float, default=0.0)
    ap.add_argument("--window-us", type=float, default=600.0)
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--collectives", action="store_true", help="GPUs side by side at collectives")
    args = ap.parse_args()
    if args.collectives:
        print_collectives(args.trace, args.hlo)
        return
    evs = events(*load(args.trace, args.hlo), args.device)
    if not evs:
        sys.exit(f"no kernel events for device {args.device} in {args.trace}")
    t0 = evs[0][0]
    if args.summary:
        per = collections.defaultdict(list)
        prev_end = None
        for ts, dur, name, comp, _ in evs:
            gap = 0.0 if prev_end is None else max(0.0, ts - prev_end)
            per[comp, name[:60]].append((dur, gap))
            prev_end = ts + dur if prev_end is None else max(prev_end, ts + dur)
        span = evs[-1][0] + evs[-1][1] - t0
        busy = sum(d for _, d, *_ in evs)
        print(f"{len(evs)} kernels, busy {busy:.0f} us, span {span:.0f} us")
        print(f"{'component':<22} {'kernel':<60} {'n':>5} {'total':>8} {'med':>7} {'gaps':>8}")
        rows = sorted(per.items(), key=lambda kv: -sum(d + g for d, g in kv[1]))
        for (comp, name), xs in rows:
            durs = [d for d, _ in xs]
            gaps = sum(g for _, g in xs)
            print(
                f"{comp:<22} {name:<60} {len(xs):>5} {sum(durs):8.1f} "
                f"{statistics.median(durs):7.2f} {gaps:8.1f}"
            )
        return
    lo, hi = t0 + args.skip_us, t0 + args.skip_us + args.window_us
    prev_end = None
    print(f"{'t':>8} {'gap':>6} {'dur':>7}  {'component':<20} kernel | scope")
    for ts, dur, name, comp, scope in evs:
        if lo <= ts <= hi:
            gap = 0.0 if prev_end is None else ts - prev_end
            print(f"{ts - t0:8.1f} {gap:6.1f} {dur:7.2f}  {comp:<20} {name[:50]} | {scope[-70:]}")
        prev_end = ts + dur if prev_end is None else max(prev_end, ts + dur)


if __name__ == "__main__":
    main()
