"""Which INT8 instructions OpenVINO will use on this processor: the flags in /proc/cpuinfo, capped by
`ONEDNN_MAX_CPU_ISA` (oneDNN, inside OpenVINO's CPU plugin, honours it without /proc/cpuinfo changing,
so one machine can stand in for older ones).

OpenVINO's CPU kernels behave differently with and without VNNI / AMX (DESIGN.md section 5): without
them u8 x s8 products are summed in 16 bits and saturate with full-range 8-bit weights; with AMX the
int8 (zero point 0) activation form is the fast one, with VNNI alone or plain AVX2 the uint8 form.
"""
import os
import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT8_FLAGS = ("avx2", "avx512f", "avx512_bf16") + VNNI_FLAGS  # what the report names

# What each ONEDNN_MAX_CPU_ISA value lets oneDNN use (its cpu_isa_t masks: AVX512_CORE_VNNI does
# not include AVX2_VNNI's 256-bit VNNI; the AMX levels include everything below them).
_ALL = frozenset({"avx2", "avx2_vnni", "avx512", "avx512_vnni", "bf16", "amx"})
ISA_CAPS = {
    "SSE41": frozenset(), "AVX": frozenset(), "AVX2": frozenset({"avx2"}),
    "AVX2_VNNI": frozenset({"avx2", "avx2_vnni"}), "AVX2_VNNI_2": frozenset({"avx2", "avx2_vnni"}),
    "AVX512_CORE": frozenset({"avx2", "avx512"}),
    "AVX512_CORE_VNNI": frozenset({"avx2", "avx512", "avx512_vnni"}),
    "AVX512_CORE_BF16": frozenset({"avx2", "avx512", "avx512_vnni", "bf16"}),
    "AVX512_CORE_FP16": frozenset({"avx2", "avx512", "avx512_vnni", "bf16"}),
    "AVX10_1_512": frozenset({"avx2", "avx512", "avx512_vnni", "bf16"}),
    "AVX512_CORE_AMX": _ALL, "AVX512_CORE_AMX_FP16": _ALL, "AVX10_1_512_AMX": _ALL,
    "AVX10_1_512_AMX_FP16": _ALL, "ALL": _ALL, "DEFAULT": _ALL,
}
_FLAG_FEATURE = {"avx2": "avx2", "avx_vnni": "avx2_vnni", "avx512f": "avx512", "avx512_vnni": "avx512_vnni",
                 "avx512_bf16": "bf16", "amx_int8": "amx"}


def _is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def read_cpuinfo(cpuinfo="/proc/cpuinfo"):
    """(model name, set of flags) of the first processor; (None, None) when unreadable."""
    try:
        text = Path(cpuinfo).read_text(errors="ignore")
    except OSError:
        return None, None
    name, flags = None, set()
    for line in text.splitlines():
        if line.startswith("model name") and name is None:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return name, flags


def isa_cap(env=None):
    """The ONEDNN_MAX_CPU_ISA (or older DNNL_MAX_CPU_ISA) value, upper-cased, or None."""
    env = os.environ if env is None else env
    value = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def effective_isa(cpuinfo="/proc/cpuinfo", env=None):
    """What OpenVINO's CPU plugin will use for INT8: {'isa': 'amx' | 'vnni' | 'avx2' | 'older' | None,
    'features': sorted usable features, 'flags': the relevant /proc/cpuinfo flags, 'cap': the
    ONEDNN_MAX_CPU_ISA value or None, 'model': CPU model name, 'source': a line saying where it came
    from}. isa None = unknown (not x86, or cpuinfo unreadable, or an unknown cap value)."""
    cap = isa_cap(env)
    if not _is_x86():
        return {"isa": None, "features": [], "flags": [], "cap": cap, "model": platform.processor() or None,
                "source": f"{platform.machine()} processor (not x86)"}
    model, flags = read_cpuinfo(cpuinfo)
    if flags is None:
        return {"isa": None, "features": [], "flags": [], "cap": cap, "model": None, "source": f"{cpuinfo} unreadable"}
    have = {feat for flag, feat in _FLAG_FEATURE.items() if flag in flags}
    source = str(cpuinfo)
    if cap is not None:
        if cap not in ISA_CAPS:
            return {"isa": None, "features": sorted(have), "flags": [f for f in INT8_FLAGS if f in flags], "cap": cap,
                    "model": model, "source": f"ONEDNN_MAX_CPU_ISA={cap} is not a oneDNN ISA name"}
        have &= ISA_CAPS[cap]
        source += f" capped by ONEDNN_MAX_CPU_ISA={cap}"
    if "amx" in have:
        isa = "amx"
    elif have & {"avx512_vnni", "avx2_vnni"}:
        isa = "vnni"
    elif "avx2" in have:
        isa = "avx2"
    else:
        isa = "older"
    return {"isa": isa, "features": sorted(have), "flags": [f for f in INT8_FLAGS if f in flags], "cap": cap,
            "model": model, "source": source}


def cpu_int8_features(cpuinfo="/proc/cpuinfo", env=None):
    """{'vnni': True/False/None, 'flags': [VNNI/AMX flags usable], 'source': where it was read}.
    None means unknown (not Linux/x86); callers then keep 8-bit weights and say so. Honours
    ONEDNN_MAX_CPU_ISA: a cap below VNNI means no VNNI, whatever the processor has."""
    e = effective_isa(cpuinfo, env)
    if e["isa"] is None:
        return {"vnni": None, "flags": [], "source": e["source"]}
    usable = {"avx512_vnni": "avx512_vnni", "avx_vnni": "avx2_vnni", "amx_int8": "amx"}
    found = [f for f in VNNI_FLAGS if f in e["flags"] and usable[f] in e["features"]]
    return {"vnni": e["isa"] in ("amx", "vnni"), "flags": found, "source": e["source"]}
