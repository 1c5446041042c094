"""Processes and the bench's own ROS side, shared by the node and soak suites.

The node under test runs as users run it — its own process, ``python -m pixel_sail_ros.ros.node`` with
``config/pixel_sail.yaml`` — under a namespace and node name no other run uses, so parallel runs (and other
nodes on the same domain) never mix. The bench talks to it from its own rclpy context, spun in a thread.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("pixel_sail_bench.ros")

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # pixel_sail_ros/
PARAMS_FILE = PACKAGE_ROOT.parent / "config" / "pixel_sail.yaml"
READY_LINE = "active: waiting for frames"


def unique_names(prefix: str) -> tuple[str, str]:
    """(namespace, node name) no other run uses."""
    tag = uuid.uuid4().hex[:8]
    return f"/{prefix}_{tag}", f"pixel_sail_{tag}"


def params_file() -> Optional[Path]:
    """config/pixel_sail.yaml of a source checkout, else the installed share/ copy, else None."""
    if PARAMS_FILE.is_file():
        return PARAMS_FILE
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("pixel_sail_ros")) / "config" / "pixel_sail.yaml"
        return installed if installed.is_file() else None
    except Exception:  # noqa: BLE001 - no ament index: parameters come from -p only
        return None


def ros_args(namespace: str, node_name: Optional[str], params: dict[str, Any]) -> list[str]:
    args = ["--ros-args", "-r", f"__ns:={namespace}"]
    if node_name:
        args += ["-r", f"__node:={node_name}"]
    pfile = params_file()
    if pfile is not None:
        args += ["--params-file", str(pfile)]
    for key, value in params.items():
        args += ["-p", f"{key}:={str(value).lower() if isinstance(value, bool) else value}"]
    return args


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the bench dies, so a killed bench never leaves a node behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ChildProcess:
    """A child process whose merged stdout/stderr is kept (last lines) for readiness checks and error reports."""

    def __init__(self, cmd: list[str], name: str, env: Optional[dict[str, str]] = None, keep_lines: int = 400) -> None:
        self.name = name
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, env=dict(env or os.environ), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.seen: set[str] = set()
        self._watch: tuple[str, ...] = ()
        self._reader = threading.Thread(target=self._read, name=f"{name}_output", daemon=True)
        self._reader.start()
        self.started = time.monotonic()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            for needle in self._watch:
                if needle in line:
                    self.seen.add(needle)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        return "\n".join(list(self.lines)[-n:])

    def wait_for_line(self, needle: str, timeout: float) -> bool:
        """True once a line containing ``needle`` was printed; False on timeout or when the process died."""
        self._watch = self._watch + (needle,)
        if any(needle in line for line in list(self.lines)):
            self.seen.add(needle)
        end = time.monotonic() + timeout
        while time.monotonic() < end and needle not in self.seen and self.alive:
            time.sleep(0.05)
        return needle in self.seen

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> float:
        """Signal, wait (kill after ``timeout``); returns seconds until it exited."""
        t0 = time.monotonic()
        if self.alive:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit %.0f s after signal %d: killing it", self.name, timeout, sig)
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2.0)
        return time.monotonic() - t0


def start_node(namespace: str, node_name: str, params: dict[str, Any], ready_timeout: float = 300.0) -> ChildProcess:
    """The pixel_sail node in its own process, waited on until it says it is active."""
    cmd = [sys.executable, "-m", "pixel_sail_ros.ros.node", *ros_args(namespace, node_name, params)]
    node = ChildProcess(cmd, "pixel_sail_node")
    if not node.wait_for_line(READY_LINE, ready_timeout):
        code = node.proc.poll()
        node.stop(timeout=5.0)
        state = f"exited with code {code}" if code is not None else f"not active after {ready_timeout:.0f} s"
        raise RuntimeError(f"the node {state}; its last output:\n{node.tail()}")
    log.info("node %s/%s active after %.1f s (pid %d)", namespace, node_name, time.monotonic() - node.started, node.pid)
    return node


def start_echo(namespace: str) -> ChildProcess:
    cmd = [sys.executable, "-m", "pixel_sail_ros.ros.bench.echo_node", *ros_args(namespace, None, {})]
    return ChildProcess(cmd, "echo_node")


class RosSide:
    """The bench's rclpy node in a private context, spun by one background thread."""

    def __init__(self, namespace: str, name: str = "pixel_sail_bench") -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.signals import SignalHandlerOptions

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.node = Node(name, namespace=namespace, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="bench_spin", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, Exception) as exc:  # noqa: BLE001 - shutdown races end the loop
            if self.context.ok():
                log.warning("bench executor stopped: %s", exc)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, period: float = 0.02) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(period)
        return predicate()

    def close(self) -> None:
        self._rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=2.0)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


class DiagnosticsWatcher:
    """The latest /diagnostics key values of one node's status ("<node name>: inference")."""

    def __init__(self, side: RosSide, node_name: str) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        self.status_name = f"{node_name}: inference"
        self.values: dict[str, str] = {}
        self.level: Optional[int] = None
        self.message = ""
        self.received = 0
        self.last_time = 0.0
        self._lock = threading.Lock()
        self._sub = side.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)

    def _on_diag(self, msg: Any) -> None:
        for status in msg.status:
            if status.name == self.status_name:
                with self._lock:
                    self.values = {kv.key: kv.value for kv in status.values}
                    self.level = int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else int(status.level)
                    self.message = status.message
                    self.received += 1
                    self.last_time = time.monotonic()

    def number(self, key: str, default: float = float("nan")) -> float:
        with self._lock:
            try:
                return float(self.values[key])
            except (KeyError, ValueError):
                return default

    def wait_fresh(self, side: RosSide, after: float, timeout: float) -> bool:
        """Wait for a status published after monotonic time ``after`` (e.g. once the stream has drained)."""
        return side.wait_for(lambda: self.last_time > after, timeout)


def stamp_key(stamp: Any) -> tuple[int, int]:
    return int(stamp.sec), int(stamp.nanosec)


def set_stamp_now(header: Any) -> tuple[int, int]:
    """Stamp a header with the wall clock (the clock rmw's receive timestamps use); returns the key."""
    now = time.time_ns()
    header.stamp.sec, header.stamp.nanosec = now // 1_000_000_000, now % 1_000_000_000
    return stamp_key(header.stamp)


def receive_ns(info: Any) -> tuple[int, str]:
    """When rmw received a message (wall clock ns) — taken before the bench's executor got to it — or now."""
    try:
        value = int(info["received_timestamp"])
        if value > 0:
            return value, "rmw_received_timestamp"
    except (KeyError, TypeError, ValueError):
        pass
    return time.time_ns(), "callback_time"


class RateLoop:
    """Calls ``tick(i)`` at ``rate_hz`` for ``seconds`` in a thread (absolute deadlines: no drift)."""

    def __init__(self, rate_hz: float, seconds: float, tick: Callable[[int], None], name: str = "stream") -> None:
        self.rate_hz, self.seconds, self._tick = rate_hz, seconds, tick
        self.ticks = 0
        self.late = 0  # ticks that started more than one period late (the bench itself could not keep up)
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        start = time.monotonic()
        n = int(round(self.seconds * self.rate_hz))
        try:
            for i in range(n):
                due = start + i * period
                delay = due - time.monotonic()
                if delay > 0:
                    if self._stop.wait(delay):
                        return
                elif -delay > period:
                    self.late += 1
                if self._stop.is_set():
                    return
                self._tick(i)
                self.ticks += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the suite
            self.error = exc

    def start(self) -> RateLoop:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def proc_fd_count(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


__all__ = [
    "ChildProcess", "DiagnosticsWatcher", "RateLoop", "RosSide", "proc_fd_count", "receive_ns", "ros_args",
    "set_stamp_now", "stamp_key", "start_echo", "start_node", "unique_names",
]
