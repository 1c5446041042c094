"""Whether this CPU multiplies bfloat16 matrices fast (AMX or AVX512-BF16), read from /proc/cpuinfo.

Why: float32 stays the CPU default, since it is what the bundled model was evaluated in and it is fast on
every CPU. On a CPU with these instructions, bfloat16 is much faster: the bundled model at 640x480 took 18 ms
against 25-28 ms on a 2-vCPU AMX VM, for a held-out gIoU 0.0024 lower (README Performance). The node says so
once at start, so nobody has to find it in the docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # as /proc/cpuinfo names them, fastest first
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str, cpuinfo: Optional[str] = None) -> Optional[str]:
    """The first processor's ``name`` field in ``cpuinfo`` (default: this machine's /proc/cpuinfo); None where
    there is none (e.g. not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Optional[str] = None) -> frozenset[str]:
    """The first processor's feature flags (empty where /proc/cpuinfo has none)."""
    return frozenset((cpuinfo_field("flags", cpuinfo) or "").split())


def fast_bf16_flags(flags: Optional[Iterable[str]] = None) -> list[str]:
    """Which of :data:`FAST_BF16_FLAGS` the CPU has (default: this machine's)."""
    have = set(cpu_flags() if flags is None else flags)
    return [f for f in FAST_BF16_FLAGS if f in have]


__all__ = ["FAST_BF16_FLAGS", "cpu_flags", "cpuinfo_field", "fast_bf16_flags"]
