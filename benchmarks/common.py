"""Shared by the benchmark scripts: the HBM floor of a decode step, timing, device memory, and a
per-component breakdown of a compiled step from a profiler trace.

The breakdown: run the step under `jax.profiler.trace(create_perfetto_trace=True)`, read the
device's kernel events from the Perfetto JSON, and attribute each kernel to a block through the
`op_name` metadata of its HLO instruction (the model opens `jax.named_scope`s "gdn",
"attention", "moe", "mlp", "lm_head", "mtp"). Collectives are recognised by name first.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import shutil
import statistics
import tempfile
import time

import jax

from qnext_jax.config import FULL
from qnext_jax.sampling import SamplingParams

HBM_BPS = 4.3e12  # H200 device-to-device copy, measured (shared/spec/anchors.md)
MATMUL_FLOPS = 7.7e14  # H200 bf16 matmul through XLA, measured (shared/spec/anchors.md)


# ---- floors ---------------------------------------------------------------------------------
def decode_bytes(cfg, batch: int, context: int) -> dict[str, float]:
    """Bytes one decode step must read (bf16 weights it touches, KV read, GDN state read + write),
    by component. Expert weights count the expected number of distinct experts `batch` tokens
    touch with uniform routing."""
    D, E, F, k = (
        cfg.hidden_size,
        cfg.num_experts,
        cfg.moe_intermediate_size,
        cfg.num_experts_per_tok,
    )
    touched = E * (1 - (1 - k / E) ** batch)
    n_full = sum(t == FULL for t in cfg.layer_types)
    n_lin = cfg.num_hidden_layers - n_full
    attn_w = (
        D * cfg.num_attention_heads * cfg.head_dim * 3
        + 2 * D * cfg.num_key_value_heads * cfg.head_dim
    ) * 2
    gdn_w = (
        D * (2 * cfg.linear_key_dim + 2 * cfg.linear_value_dim)
        + D * 2 * cfg.linear_num_value_heads
        + cfg.linear_value_dim * D
    ) * 2
    state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4 * 2
    kv = 2 * context * cfg.num_key_value_heads * cfg.head_dim * 2
    return {
        "moe": cfg.num_hidden_layers
        * (touched * 3 * D * F * 2 + 3 * D * cfg.shared_expert_intermediate_size * 2 + D * E * 2),
        "attention": n_full * (attn_w + batch * kv),
        "gdn": n_lin * (gdn_w + batch * state),
        "lm_head": cfg.vocab_size * D * 2,
    }


def floor_seconds(
    cfg, batch: int, context: int, devices: int = 1, attention_replicas: int = 1
) -> float:
    """decode_bytes / (devices x HBM bandwidth): every byte is read by exactly one device, but
    attention and GDN bytes (weights, KV, state) once per attention replica."""
    b = decode_bytes(cfg, batch, context)
    b["attention"] *= attention_replicas
    b["gdn"] *= attention_replicas
    return sum(b.values()) / (HBM_BPS * devices)


def prefill_flops(cfg, tokens: int) -> float:
    """Matmul FLOPs of a prefill (2 per multiply-add): projections, the 10 routed + shared
    experts, attention scores over the causal half, lm_head for the last token only."""
    D = cfg.hidden_size
    n_full = sum(t == FULL for t in cfg.layer_types)
    n_lin = cfg.num_hidden_layers - n_full
    Hq, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = D * (2 * Hq * Dh + 2 * Hkv * Dh) + Hq * Dh * D
    gdn = (
        D * (2 * cfg.linear_key_dim + 2 * cfg.linear_value_dim + 2 * cfg.linear_num_value_heads)
        + cfg.linear_value_dim * D
    )
    moe = (
        cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size
        + 3 * D * cfg.shared_expert_intermediate_size
        + D * cfg.num_experts
    )
    per_token = n_full * attn + n_lin * gdn + cfg.num_hidden_layers * moe
    # causal attention: QK^T and PV over ~T/2 keys per query
    scores = n_full * 2 * Hq * Dh * tokens / 2
    # GDN chunked form: about 4 K x V products per token per value head
    gdn_core = n_lin * 4 * cfg.linear_num_value_heads * cfg.linear_key_head_dim**2
    return 2 * tokens * (per_token + scores + gdn_core) + 2 * D * cfg.vocab_size


# ---- timing and memory ----------------------------------------------------------------------
def dataclass_changes(spec: str, base) -> dict:
    """'default' -> {}; 'key=value,...' -> {key: value} over the integer / boolean / None-able
    fields of the dataclass instance `base` (block settings given on a command line).
    SystemExit naming the item and the allowed keys otherwise."""
    if spec == "default":
        return {}
    fields = [
        f.name
        for f in dataclasses.fields(base)
        if isinstance(getattr(base, f.name), (int, type(None)))  # bool is an int
    ]
    changes = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in fields or not value.lstrip("-").isdigit():
            raise SystemExit(
                f"{spec!r}: {item!r} must be key=integer with key one of " + ", ".join(fields)
            )
        changes[key] = bool(int(value)) if isinstance(getattr(base, key), bool) else int(value)
    return changes


def median_time(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() (which must block until its device work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_chained(fn, args, feed, inner: int, reps: int, unroll: bool = False) -> float:
    """Seconds per call of fn(*args): `inner` calls in one jitted loop, each call's first
    argument made from the previous output by feed(x, out) (so no call is hoisted; host
    dispatch is amortised), median over reps. unroll: the calls as straight-line code, for
    calls of a few microseconds (a loop iteration on the GPU costs ~15 us of its own)."""

    @jax.jit
    def loop(x, *rest):
        return jax.lax.fori_loop(0, inner, lambda _, x: feed(x, fn(x, *rest)), x, unroll=unroll)

    return median_time(lambda: jax.block_until_ready(loop(*args)), reps) / inner


def time_layer_walk(step, x, operands, n_layers: int, passes: int = 4, reps: int = 15) -> float:
    """Seconds per call of step(x, layer, *operands) -> x (layer a Python int) over `passes`
    passes through n_layers layers in one jitted program, as in the model's layer scan: each
    call reads another layer's weights than the last, so none sit in L2 (50 MB on the H200).
    After ~0.3 s of warm-up calls: short bursts on an idle GPU (right after a compile) ran up
    to 2x slower, all the more for the faster configurations. Median of reps runs."""

    @jax.jit
    def loop(x, operands):
        for layer in list(range(n_layers)) * passes:
            x = step(x, layer, *operands)
        return x

    run = lambda: jax.block_until_ready(loop(x, operands))  # noqa: E731
    run()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        run()
    return median_time(run, reps, warmup=0) / (n_layers * passes)


def admit(engine, prompts, max_tokens: int = 1):
    """Queue greedy requests and admit them at once (chunked prefill of each prompt[:-1] and
    slot setup), blocked on the cache. Returns the requests."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    engine._admit_waiting()
    jax.block_until_ready(engine.cache)
    return reqs


def time_admission(engine, prompt, reps: int = 3) -> tuple[float, float]:
    """(median seconds of `reps` admissions of one prompt after a first, compiling one; that
    first one's seconds). Each request is aborted after its admission, freeing the slot."""
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        (req,) = admit(engine, [prompt])
        times.append(time.perf_counter() - t)
        engine.abort(req.request_id)
    return statistics.median(times[1:]), times[0]


def device_memory() -> list[dict[str, float]]:
    """GiB in use and peak per local device (empty dicts where the backend does not say)."""
    out = []
    for d in jax.local_devices():
        s = d.memory_stats() or {}
        out.append(
            {
                "device": str(d.id),
                "in_use_gib": s.get("bytes_in_use", 0) / 2**30,
                "peak_gib": s.get("peak_bytes_in_use", 0) / 2**30,
                "limit_gib": s.get("bytes_limit", 0) / 2**30,
            }
        )
    return out


# ---- profile breakdown ----------------------------------------------------------------------
COMPONENTS = ("mtp", "gdn", "attention", "moe", "mlp", "lm_head")
_COLLECTIVE = re.compile(
    r"nccl|psum|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all|collective"
    r"|send|recv",
    re.I,
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]+)\"", re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata; also under the kernel spelling ('.' and
    '-' as '_'), since kernels launched from a command buffer carry only their kernel name."""
    out = {}
    for name, op in _INSTR.findall(hlo_text):
        out[name] = op
        out[re.sub(r"[.\-]", "_", name)] = op
    return out


def classify(kernel: str, hlo_op: str | None, names: dict[str, str]) -> str:
    if _COLLECTIVE.search(kernel) or (hlo_op and _COLLECTIVE.search(hlo_op)):
        return "collectives"
    op = names.get(hlo_op or "") or names.get(kernel) or ""
    if not op:  # Pallas kernels are named after their function
        low = kernel.lower()
        if "gdn" in low or "conv1d" in low:
            return "gdn"
        if low.startswith("moe_"):  # pallas_kernels/moe: moe_gate_up, moe_down
            return "moe"
        if low.startswith("attention_"):  # pallas_kernels/attention: attention_decode
            return "attention"
        if low.startswith("linear"):  # pallas_kernels/linear: every block's projections
            return "projections"
        if low.startswith("rms_norm"):  # pallas_kernels/rms_norm: the layers' norms
            return "other"
        return "other (unattributed)"
    if _COLLECTIVE.search(op):
        return "collectives"
    parts = op.split("/")
    for comp in COMPONENTS:
        if comp in parts:
            return comp
    return "other"


_GPU_LINE = re.compile(r"/device:GPU:(\d+)\b")


def _gpu_processes(trace) -> dict[int, int]:
    """{trace pid: GPU id} of the trace's GPU process lines."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            m = _GPU_LINE.search(str(e.get("args", {}).get("name", "")))
            if m:
                out[e["pid"]] = int(m.group(1))
    return out


def trace_gpus(trace) -> list[int]:
    """The GPU ids a (loaded) trace has lines for."""
    return sorted(set(_gpu_processes(trace).values()))


def _device_events(trace: dict, device_id: int = 0):
    """Kernel / memcpy events on the given GPU's stream lines (not the derived "XLA Ops" and
    "XLA Modules" lines, which repeat them): (name, args, dur_us, ts_us)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {pid for pid, gpu in _gpu_processes(trace).items() if gpu == device_id}
    threads = {
        (e["pid"], e["tid"]): str(e.get("args", {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in pids
    }
    streams = {key for key, name in threads.items() if name.lower().startswith("stream")}
    for e in events:
        if e.get("ph") != "X":
            continue
        if not pids:  # CPU backend: ops run on host threads, each event names its HLO op
            if "hlo_op" in e.get("args", {}):
                yield e["name"], e["args"], float(e.get("dur", 0)), float(e.get("ts", 0))
            continue
        if e.get("pid") not in pids or (streams and (e["pid"], e.get("tid")) not in streams):
            continue
        yield e["name"], e.get("args", {}), float(e.get("dur", 0)), float(e.get("ts", 0))


def profile_breakdown(
    run, hlo_text: str, steps: int, device_id: int = 0, top: int = 30, keep_trace: str | None = None
) -> dict:
    """Run `run()` (it must block) under the profiler; returns {component: us per step} of
    kernel time on one device, plus 'busy' (sum), 'span' (first kernel start to last end),
    'kernels' (launches per step), 'launches' ({component: launches per step}) and 'top' (the
    `top` costliest kernels: component, name, HLO op, us, the op's source scope). keep_trace:
    a path to copy the perfetto trace (.json.gz) to, to read the step kernel by kernel. Raises
    RuntimeError when the trace has no device events."""
    names = hlo_op_names(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run()
        paths = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not paths:
            raise RuntimeError("the profiler wrote no perfetto_trace.json.gz")
        if keep_trace:
            shutil.copyfile(paths[0], keep_trace)
        with gzip.open(paths[0]) as fh:
            trace = json.load(fh)
    per, by_kernel, launches = collections.Counter(), collections.Counter(), collections.Counter()
    n, first, last = 0, float("inf"), 0.0
    for name, args, dur, ts in _device_events(trace, device_id):
        comp = classify(name, args.get("hlo_op"), names)
        per[comp] += dur
        launches[comp] += 1
        op = args.get("hlo_op", "")
        by_kernel[comp, name[:80], op, (names.get(op) or names.get(name) or "")[-120:]] += dur
        n += 1
        first, last = min(first, ts), max(last, ts + dur)
    if not n:
        raise RuntimeError(f"no device events for device {device_id} in the trace")
    out = {k: v / steps for k, v in per.items()}
    out["busy"] = sum(per.values()) / steps
    out["span"] = (last - first) / steps
    out["kernels"] = n / steps
    out["launches"] = {k: v / steps for k, v in launches.items()}
    out["top"] = [(c, k, op, us / steps, src) for (c, k, op, src), us in by_kernel.most_common(top)]
    return out
