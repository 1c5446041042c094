"""Small measuring tools shared by the suites: percentiles, JSON-safe rounding, a peak-RSS sampler.

Kept free of torch and rclpy at import time so the node and soak suites (which measure another process)
do not pay for them.
"""

from __future__ import annotations

import math
import os
import platform
import threading
from typing import Any, Optional, Sequence

from pixel_sail_ros.cpu_features import cpuinfo_field, fast_bf16_flags


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def rounded(value: float, digits: int = 3) -> Optional[float]:
    """JSON-safe: NaN/inf become None (JSON has no NaN)."""
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


class PeakRSS:
    """Samples a process's resident set size in a background thread; ``peak_mb`` is the largest sample.

    Why sampling: ``ru_maxrss`` is a high-water mark for the whole life of the process, so it cannot give
    one benchmark entry's peak when several run in the same process.
    """

    def __init__(self, pid: Optional[int] = None, period_s: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process(pid or os.getpid())
        self._period = period_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.peak_bytes = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._period)

    def sample(self) -> int:
        rss = self._proc.memory_info().rss
        self.peak_bytes = max(self.peak_bytes, rss)
        return rss

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="peak_rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def machine_info(extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Where the numbers come from: host, CPU, core count, load (the dev box is shared, so say so)."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_fast_bf16": fast_bf16_flags(),  # AMX / AVX512-BF16: what --dtype bfloat16 gains depends on them
        "python": platform.python_version(),
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    info.update(extra or {})
    return info


__all__ = ["PeakRSS", "cpu_model", "machine_info", "percentile", "rounded"]
