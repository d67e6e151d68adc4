"""Which INT8 instructions this processor has (read from /proc/cpuinfo).

OpenVINO's CPU kernels behave differently with and without VNNI / AMX (DESIGN.md section 5): without
them u8 x s8 products are summed in 16 bits and saturate with full-range 8-bit weights.
"""
import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_features(cpuinfo="/proc/cpuinfo"):
    """{'vnni': True/False/None, 'flags': [VNNI/AMX flags found], 'source': where it was read}.
    None means unknown (not Linux/x86); callers then keep 8-bit weights and say so."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return {"vnni": None, "flags": [], "source": f"{machine} processor (not x86: no u8 x s8 saturation issue known)"}
    try:
        text = Path(cpuinfo).read_text(errors="ignore")
    except OSError:
        return {"vnni": None, "flags": [], "source": f"{cpuinfo} unreadable"}
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    found = [f for f in VNNI_FLAGS if f in flags]
    return {"vnni": bool(found), "flags": found, "source": str(cpuinfo)}

