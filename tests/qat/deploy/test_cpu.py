"""qat.deploy.cpu: the ISA OpenVINO will use, from /proc/cpuinfo flags capped by ONEDNN_MAX_CPU_ISA."""
import platform

import pytest

from qat.deploy.cpu import cpu_int8_features, effective_isa

EPYC = "avx2 avx512f avx512_bf16 avx512_vnni avx_vnni"  # this machine's kind
XEON_AMX = EPYC + " amx_tile amx_int8 amx_bf16"
OLD = "avx2 fma"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")

    def write(flags):
        f = tmp_path / "cpuinfo"
        f.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse {flags}\n")
        return f
    return write


@pytest.mark.parametrize("flags, cap, isa", [
    (EPYC, None, "vnni"), (EPYC, "AVX2", "avx2"), (EPYC, "avx512_core_vnni", "vnni"), (EPYC, "AVX2_VNNI", "vnni"),
    (EPYC, "AVX512_CORE", "avx2"), (XEON_AMX, None, "amx"), (XEON_AMX, "AVX512_CORE_VNNI", "vnni"),
    (XEON_AMX, "AVX512_CORE_AMX", "amx"), (OLD, None, "avx2"), (OLD, "ALL", "avx2"), ("sse4_2", None, "older"),
    (EPYC, "NOT_AN_ISA", None)])
def test_effective_isa_follows_flags_and_the_onednn_cap(cpuinfo, flags, cap, isa):
    env = {"ONEDNN_MAX_CPU_ISA": cap} if cap else {}
    e = effective_isa(cpuinfo(flags), env=env)
    assert e["isa"] == isa and e["model"] == "Test CPU"
    assert e["cap"] == (cap.upper() if cap else None)
    if cap and isa:
        assert f"ONEDNN_MAX_CPU_ISA={cap.upper()}" in e["source"]


def test_cpu_int8_features_honours_the_cap(cpuinfo):
    f = cpuinfo(EPYC)
    assert cpu_int8_features(f, env={}) == {"vnni": True, "flags": ["avx512_vnni", "avx_vnni"], "source": str(f)}
    capped = cpu_int8_features(f, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert capped["vnni"] is False and capped["flags"] == []
    assert cpu_int8_features(f, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"})["flags"] == ["avx512_vnni"]
    assert cpu_int8_features(cpuinfo("avx2 avx_vnni amx_int8"), env={})["flags"] == ["avx_vnni", "amx_int8"]
    assert cpu_int8_features(cpuinfo(OLD), env={})["vnni"] is False


def test_unknown_processors(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert effective_isa(env={})["isa"] is None and cpu_int8_features(env={})["vnni"] is None
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert "unreadable" in effective_isa(tmp_path / "missing", env={})["source"]
