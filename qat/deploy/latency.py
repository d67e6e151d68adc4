"""OpenVINO latency measured side by side, against the fastest float option the runtime offers on
this CPU (its default precision, bf16 where the CPU has it, and forced f32): one measurement shared by
benchmarks/bench_latency.py and demo.py, so every table says "slower" when INT8 is slower."""
import statistics
from collections import defaultdict

import numpy as np

from qat.deploy.base import log
from qat.deploy.openvino import compile_config, conv_precisions
from qat.timing import take_turns


def op_profile(request, x, calls=5, top=12):
    """Per-op profile of an infer request compiled with PERF_COUNT, over `calls` calls: every node's
    median time (a node that lost its core to another process in one call does not count), grouped by
    op type and kernel, slowest first: rows {'op', 'kernel', 'count', 'ms', 'share'}."""
    per_node = defaultdict(list)
    kind = {}
    for _ in range(calls):
        request.infer({0: x})
        for p in request.get_profiling_info():
            per_node[p.node_name].append(p.real_time.total_seconds() * 1e3)
            kind[p.node_name] = (p.node_type, p.exec_type)
    agg = defaultdict(lambda: [0, 0.0])
    for node, times in per_node.items():
        ms = statistics.median(times)
        if ms <= 0:
            continue  # folded away or a no-op view
        a = agg[kind[node]]
        a[0] += 1
        a[1] += ms
    total = sum(ms for _, ms in agg.values()) or 1.0
    rows = [{"op": op, "kernel": kernel, "count": n, "ms": ms, "share": ms / total}
            for (op, kernel), (n, ms) in sorted(agg.items(), key=lambda kv: -kv[1][1])]
    return {"total_ms": total, "ops": rows[:top]}

def float_precisions():
    """The float options the CPU plugin offers, fastest-first candidates: {label: precision}. The
    runtime's default (bf16 where the CPU has it, e.g. AMX or AVX512_BF16) and forced f32."""
    import openvino as ov

    default = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    default = {"<Type: 'bfloat16'>": "bf16", "<Type: 'float32'>": "f32", "<Type: 'float16'>": "f16"}.get(default, default)
    return {f"default ({default})": None, "f32": "f32"}

def time_round_robin(models, shape, threads=None, iters=5, rounds=4, warmup=2, profile=()):
    """Latency of OpenVINO models measured side by side: {label: (ov.Model, precision or None)} ->
    {label: row}. Every model is compiled for `shape` (B, 3, H, W), then the models take turns,
    `iters` calls each per round, so load on a shared machine hits them alike. Row: latency_ms
    (median per call), imgs_per_s, precision (what the plugin runs), int8_convs, convs; or
    {'error': ...} for a model the plugin could not compile. Labels in `profile` also get 'profile'
    (op_profile of a separate PERF_COUNT compile, so counting does not slow the timed calls)."""
    import openvino as ov

    core = ov.Core()
    compiled, rows = {}, {}
    for label, (ov_model, precision) in models.items():
        m = ov_model.clone()
        try:  # a static-shape file cannot take every batch size
            m.reshape({m.inputs[0].get_any_name(): list(shape)})
            compiled[label] = core.compile_model(m, "CPU", compile_config(precision, threads))
        except RuntimeError as e:
            rows[label] = {"error": next((ln for ln in str(e).strip().splitlines() if "shape" in ln.lower()),
                                         (str(e).strip().splitlines() or ["?"])[-1])[:200]}
            log(f"{label}: OpenVINO could not compile it for {list(shape)}: {rows[label]['error']}")
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    reqs = {k: c.create_infer_request() for k, c in compiled.items()}
    times = take_turns({k: (lambda r=r: r.infer({0: x})) for k, r in reqs.items()}, rounds, iters, warmup)
    for k, c in compiled.items():
        med = statistics.median(times[k])
        convs = conv_precisions(c)
        prec = str(c.get_property("INFERENCE_PRECISION_HINT"))
        rows[k] = {"latency_ms": med * 1e3, "imgs_per_s": shape[0] / med, "int8_convs": convs["int8"],
                   "convs": convs["total"], "precision": {"<Type: 'bfloat16'>": "bf16",
                                                          "<Type: 'float32'>": "f32"}.get(prec, prec)}
    for k in profile:
        if k in compiled:
            m = models[k][0].clone()
            m.reshape({m.inputs[0].get_any_name(): list(shape)})
            r = core.compile_model(m, "CPU", compile_config(models[k][1], threads, profile=True)).create_infer_request()
            r.infer({0: x})
            rows[k]["profile"] = op_profile(r, x)
    return {k: rows[k] for k in models}

def versus_float(rows, float_labels):
    """Add 'vs_float' (speed relative to the fastest float row: > 1 = faster) and 'slower' to every
    timed row; returns the fastest float label (None when no float row ran)."""
    timed = [k for k in float_labels if "latency_ms" in rows.get(k, {})]
    if not timed:
        return None
    best = min(timed, key=lambda k: rows[k]["latency_ms"])
    for k, r in rows.items():
        if "latency_ms" in r:
            r["vs_float"] = rows[best]["latency_ms"] / r["latency_ms"]
            if k not in float_labels:
                r["slower"] = r["vs_float"] < 1.0
    return best

def speed_phrase(ratio):
    """'1.85x faster' / '1.35x slower': a ratio below one is never shown as a speed-up."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
