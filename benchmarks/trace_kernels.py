"""Read a profiled program kernel by kernel: the launches on one GPU in time order, each with
the idle gap before it, its duration, component and source scope.

  python benchmarks/trace_kernels.py DIR/_decode_impl_0.trace.json.gz [--hlo DIR/...hlo.txt]
      [--device 0] [--skip-us 0] [--window-us 600] [--summary]

The trace and HLO are what `bench_80b.py --hlo-dir DIR` keeps of each profiled program.
--skip-us / --window-us pick a slice of the timeline (from the first kernel); --summary
prints, per kernel name, launches, total and median time, and the gaps that precede it.
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

from common import _device_events, classify, hlo_op_names  # noqa: E402


def events(trace_path: str, hlo_path: str | None, device: int):
    with gzip.open(trace_path) as fh:
        trace = json.load(fh)
    names = {}
    if hlo_path:
        with open(hlo_path) as fh:
            names = hlo_op_names(fh.read())
    out = []
    for name, args, dur, ts in _device_events(trace, device):
        op = args.get("hlo_op", "")
        scope = names.get(op) or names.get(name) or ""
        out.append((ts, dur, name, classify(name, op or None, names), scope))
    out.sort()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--hlo", default=None)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--skip-us", type=float, default=0.0)
    ap.add_argument("--window-us", type=float, default=600.0)
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    evs = events(args.trace, args.hlo, args.device)
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
