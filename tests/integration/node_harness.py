"""Start the real node as a user does (own process, --params-file config/pixel_sail.yaml) and talk to it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image

from pixel_sail_ros.ros.image_conversion import numpy_to_image
from pixel_sail_ros.srv import Segment

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "pixel_sail_ros" / "checkpoints" / "shapesref_tiny"


class NodeProcess:
    """The pixel_sail node in its own process; its output is collected for assertions on log lines."""

    def __init__(self, namespace: str, params: dict[str, Any], extra_args: Optional[list[str]] = None) -> None:
        cmd = [sys.executable, "-m", "pixel_sail_ros.ros.node", "--ros-args", "-r", f"__ns:={namespace}",
               "--params-file", str(ROOT / "config" / "pixel_sail.yaml")]
        for k, v in params.items():
            val = str(v).lower() if isinstance(v, bool) else str(v)
            cmd += ["-p", f"{k}:={val}"]
        cmd += extra_args or []
        self.proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_log(self, needle: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(needle in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        return any(needle in line for line in self.lines)

    def stop(self, sig: int = 2, timeout: float = 10.0) -> float:
        """Send a signal and wait; returns seconds until the process exited."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)
        return time.monotonic() - t0


class Client:
    """A test-side node in its own rclpy context, spun on demand."""

    def __init__(self, namespace: str, name: str = "test_client") -> None:
        self.ctx = Context()
        rclpy.init(context=self.ctx, signal_handler_options=SignalHandlerOptions.NO)
        self.node = Node(name, namespace=namespace, context=self.ctx)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.02)
        return predicate()

    def call(self, client: Any, request: Any, timeout: float = 60.0) -> Any:
        fut = client.call_async(request)
        assert self.spin_until(fut.done, timeout), f"no response from {client.srv_name} within {timeout} s"
        return fut.result()

    def close(self) -> None:
        self.executor.remove_node(self.node)
        self.node.destroy_node()
        self.executor.shutdown()
        rclpy.try_shutdown(context=self.ctx)


@contextlib.contextmanager
def active_node(namespace: str, params: dict[str, Any], client_name: str,
                ready_s: float = 120.0) -> Iterator[tuple[Client, NodeProcess]]:
    """A node of its own (own process, as a user starts it), once active, and a client in its namespace."""
    proc = NodeProcess(namespace, params)
    client = Client(namespace, client_name)
    try:
        assert proc.wait_for_log("active: waiting for frames", ready_s), proc.output
        yield client, proc
    finally:
        client.close()
        proc.stop()


def segment_caller(client: Client) -> Callable[..., Any]:
    """``call(request, timeout=60.0)`` → the node's ``segment`` answer, once the service is there."""
    cli = client.node.create_client(Segment, "segment")
    assert client.spin_until(cli.service_is_ready, 30), "segment service never appeared"
    return lambda req, timeout=60.0: client.call(cli, req, timeout)


def parameter_setter(client: Client, node_name: str = "pixel_sail") -> Callable[[str, Any], None]:
    """``set(name, value)`` on the running node through its set_parameters service; a refusal fails the test."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    cli = client.node.create_client(SetParameters, f"{node_name}/set_parameters")
    assert client.spin_until(cli.service_is_ready, 20), "set_parameters service never appeared"

    def set_parameter(name: str, value: Any) -> None:
        res = client.call(cli, SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()]))
        assert res.results[0].successful, res.results[0].reason

    return set_parameter


class DiagnosticsReader:
    """The node's /diagnostics key-values, as they arrive."""

    def __init__(self, client: Client, status_suffix: str = "pixel_sail: inference") -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        self._client, self._suffix = client, status_suffix
        self._statuses: list[tuple[float, dict[str, str]]] = []
        client.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_array, 10)

    def _on_array(self, msg: Any) -> None:
        stamp = msg.header.stamp.sec + 1e-9 * msg.header.stamp.nanosec
        self._statuses += [(stamp, {kv.key: kv.value for kv in s.values}) for s in msg.status
                           if s.name.endswith(self._suffix)]

    def latest(self) -> dict[str, str]:
        return self._statuses[-1][1] if self._statuses else {}

    def after(self, wall_time: float, timeout: float = 15.0) -> dict[str, str]:
        """The first status stamped after ``wall_time`` (time.time()), waiting for it."""
        def fresh() -> list[dict[str, str]]:
            return [values for stamp, values in self._statuses if stamp > wall_time]

        assert self._client.spin_until(lambda: bool(fresh()), timeout), "no fresh /diagnostics"
        return fresh()[0]


def a_of_b(value: str) -> tuple[int, int]:
    """The two counts of a /diagnostics "A of B" value (draft_tokens_accepted, answers_from_the_image_pass)."""
    a, of, b = value.partition(" of ")
    assert of, f"not an 'A of B' count: {value!r}"
    return int(a), int(b)


def image_msg(rgb: np.ndarray, sec: int, frame_id: str = "camera_optical") -> Image:
    msg = numpy_to_image(rgb, "rgb8")
    msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = sec, 5, frame_id
    return msg


def outputs_3d_for(client: Client, marker_arrays: list, clouds: list, sec: int, timeout: float):
    """The MarkerArray and PointCloud2 the node sent with the result for the frame stamped ``sec``."""
    def find():
        arrays = [a for a in marker_arrays if a.markers and a.markers[0].header.stamp.sec == sec]
        cloud = [c for c in clouds if c.header.stamp.sec == sec]
        return (arrays[0], cloud[0]) if arrays and cloud else None

    assert client.spin_until(lambda: find() is not None, timeout), f"no markers and cloud for the frame at {sec}"
    return find()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mono8_mask(img: Any) -> np.ndarray:
    return np.frombuffer(bytes(img.data), np.uint8).reshape(img.height, img.step)[:, : img.width] > 0
