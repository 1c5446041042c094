"""cpu_features: the flags the node's bfloat16 hint is based on."""

from __future__ import annotations

from pathlib import Path

from pixel_sail_ros import cpu_features

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu
"""

OLDER = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


def test_the_first_processors_flags_are_read():
    flags = cpu_features.cpu_flags(SAPPHIRE_RAPIDS)
    assert {"avx512f", "amx_bf16", "amx_tile"} <= flags and "spectre_v1" not in flags
    assert cpu_features.fast_bf16_flags(flags) == ["amx_bf16", "avx512_bf16"]


def test_other_fields_are_read_from_the_first_processor():
    assert cpu_features.cpuinfo_field("model name", SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Processor"
    assert cpu_features.cpuinfo_field("microcode", SAPPHIRE_RAPIDS) is None


def test_a_cpu_without_bf16_instructions_gets_no_hint():
    assert cpu_features.fast_bf16_flags(cpu_features.cpu_flags(OLDER)) == []
    assert cpu_features.cpu_flags("model name : x\n") == frozenset()


def test_no_cpuinfo_means_no_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_features, "CPUINFO", Path(tmp_path) / "missing")
    assert cpu_features.cpu_flags() == frozenset() and cpu_features.fast_bf16_flags() == []
    assert cpu_features.cpuinfo_field("model name") is None


def test_this_machines_flags_agree_with_proc_cpuinfo():
    path = Path("/proc/cpuinfo")
    if not path.exists():
        assert cpu_features.cpu_flags() == frozenset()
        return
    line = next((ln for ln in path.read_text().splitlines() if ln.startswith("flags")), "")
    assert cpu_features.cpu_flags() == frozenset(line.partition(":")[2].split())
