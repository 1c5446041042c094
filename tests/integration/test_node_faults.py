"""Faults never take the node down: engine failures, bad configuration, corrupt checkpoints, signals.

The engine-failure test injects a real exception into the real engine of a real node (in this process, so
the fault can be placed); the others start the node as its own process, as a user does.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("pixel_sail_ros.msg", reason="interfaces not built: run `make build`")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from pixel_sail_ros.msg import SegmentationResult  # noqa: E402
from pixel_sail_ros.ros.image_conversion import numpy_to_image, rgb8_to_compressed  # noqa: E402
from pixel_sail_ros.ros.node import PixelSailNode, RosLogHandler  # noqa: E402
from pixel_sail_ros.training.camera_frames import render_frame  # noqa: E402
from pixel_sail_ros.srv import Segment  # noqa: E402

from .node_harness import Client, NodeProcess, active_node  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _ns() -> str:
    return "/f" + uuid.uuid4().hex[:10]


@contextlib.contextmanager
def _in_process_node(ns: str, model_dir: str) -> Iterator[PixelSailNode]:
    """The real node, active and spun as `pixel_sail_node` spins it, but in this process so faults can be placed."""
    ctx = Context()
    rclpy.init(context=ctx, signal_handler_options=SignalHandlerOptions.NO)
    node = PixelSailNode(context=ctx, namespace=ns, parameter_overrides=[
        Parameter("model_path", value=model_dir), Parameter("device", value="cpu"),
        Parameter("diagnostics_period_s", value=0.2)])
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield node
    finally:
        executor.shutdown(timeout_sec=1)
        node._stop_worker(timeout=2)
        node._release_engine()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


def test_the_library_s_warnings_reach_the_node_s_ros_log(model_dir: str, capfd: pytest.CaptureFixture) -> None:
    """The engine warns through Python logging (e.g. a failed compilation it turned off): the node forwards it to
    its ROS logger, and stops forwarding when it is destroyed."""
    library = logging.getLogger("pixel_sail_ros")
    with _in_process_node(_ns(), model_dir):
        logging.getLogger("pixel_sail_ros.engine").warning("torch.compile failed (probe %d)", 7)
        err = capfd.readouterr().err
    assert "pixel_sail_ros.engine: torch.compile failed (probe 7)" in err, err[-2000:]
    assert "pixel_sail]" in err.split("pixel_sail_ros.engine: torch.compile failed")[0].splitlines()[-1]  # its logger
    assert not any(isinstance(h, RosLogHandler) for h in library.handlers)


def test_engine_failure_is_reported_and_the_next_request_works(model_dir: str) -> None:
    ns = _ns()
    with _in_process_node(ns, model_dir) as node:
        client = Client(ns, "fault_client")
        try:
            real = node._engine.segment
            failures = []

            def fail_once(*args, **kwargs):
                if not failures:
                    failures.append(1)
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return real(*args, **kwargs)

            before = node.errors
            node._on_image(object(), object())  # not an Image (nor message info): counted and logged, never raised
            node._on_depth(b"garbage")
            assert node.errors == before + 2
            node._engine.segment = fail_once
            diags: list[DiagnosticArray] = []
            client.node.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 50)
            cli = client.node.create_client(Segment, "segment")
            assert client.spin_until(cli.service_is_ready, 20)
            frame = render_frame(99, 0, 160, 120)
            img = numpy_to_image(frame.rgb, "rgb8")
            failed = client.call(cli, Segment.Request(image=img, text="red circle"))
            assert not failed.success and "out of memory" in failed.message, failed.message
            assert client.spin_until(lambda: any(s.level == DiagnosticStatus.ERROR and "out of memory" in s.message
                                                 for m in diags for s in m.status), 5), "no ERROR diagnostics"
            ok = client.call(cli, Segment.Request(image=img, text="red circle"))
            assert ok.success, ok.message
            assert node.errors >= 1 and node.results >= 1
        finally:
            client.close()


def test_a_slow_service_call_leaves_the_node_responsive_and_deactivate_answers_every_waiting_call(
        model_dir: str) -> None:
    """The service runs in the worker, so the single-threaded executor keeps serving topics and the lifecycle
    while a call runs; a call still waiting when the node deactivates is answered, and so is one to an inactive
    node."""
    ns = _ns()
    with _in_process_node(ns, model_dir) as node:
        client = Client(ns, "slow_client")
        try:
            real, started, release = node._engine.segment, threading.Event(), threading.Event()

            def slow(*args, **kwargs):
                started.set()
                assert release.wait(30)
                return real(*args, **kwargs)

            node._engine.segment = slow
            cli = client.node.create_client(Segment, "segment")
            change = client.node.create_client(ChangeState, "pixel_sail/change_state")
            prompt = client.node.create_publisher(String, "prompt", 10)
            assert client.spin_until(lambda: cli.service_is_ready() and change.service_is_ready()
                                     and prompt.get_subscription_count() > 0, 20)
            img = numpy_to_image(render_frame(99, 0, 160, 120).rgb, "rgb8")
            running = cli.call_async(Segment.Request(image=img, text="red circle"))
            assert client.spin_until(started.is_set, 20), "the first call never reached the engine"
            waiting = cli.call_async(Segment.Request(image=img, text="green square"))
            assert client.spin_until(lambda: len(node._queue.calls) == 1, 10), "the second call was not queued"
            prompt.publish(String(data="blue triangle"))  # taken by the executor while the model is busy
            assert client.spin_until(lambda: node._prompt == "blue triangle", 10), "the executor was blocked"
            deactivate = ChangeState.Request()
            deactivate.transition.id = Transition.TRANSITION_DEACTIVATE
            transition = change.call_async(deactivate)
            client.spin_until(lambda: False, 0.3)  # the transition now waits for the worker's running call
            release.set()
            assert client.spin_until(lambda: running.done() and waiting.done() and transition.done(), 30)
            assert running.result().success, running.result().message
            assert not waiting.result().success and "deactivated before this request ran" in waiting.result().message
            assert transition.result().success
            inactive = client.call(cli, Segment.Request(image=img, text="red circle"), timeout=10)
            assert not inactive.success and "not active" in inactive.message, inactive.message
        finally:
            release.set()
            client.close()


@pytest.mark.parametrize("params, needle", [
    ({"device": "banana"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:3"}, "CUDA is not available"),
    ({"dtype": "float64"}, "dtype"),
    ({"device": "cpu", "decoding": "graphs"}, "decoding='graphs' needs the model on a CUDA device"),
], ids=["bad-device", "absent-gpu", "bad-dtype", "graphs-on-cpu"])
def test_bad_configuration_fails_configure_with_a_clear_message(model_dir: str, params: dict, needle: str) -> None:
    proc = NodeProcess(_ns(), {"model_path": model_dir, **params})
    try:
        proc.proc.wait(timeout=60)
    finally:
        proc.stop()
    assert proc.proc.returncode != 0
    assert "configure failed" in proc.output and needle in proc.output, proc.output[-2000:]


def test_corrupt_checkpoint_fails_configure_with_a_clear_message(model_dir: str, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt"
    shutil.copytree(model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = NodeProcess(_ns(), {"model_path": str(bad), "device": "cpu"})
    try:
        proc.proc.wait(timeout=60)
    finally:
        proc.stop()
    assert proc.proc.returncode != 0 and "configure failed" in proc.output, proc.output[-2000:]


def test_compressed_input_and_sigint_mid_stream_exits_fast(model_dir: str) -> None:
    ns = _ns()
    proc = NodeProcess(ns, {"model_path": model_dir, "device": "cpu", "use_compressed": True})
    c = Client(ns, "compressed_client")
    try:
        assert proc.wait_for_log("active: waiting for frames on 'image/compressed'", 120), proc.output
        pub = c.node.create_publisher(CompressedImage, "image/compressed", qos_profile_sensor_data)
        raw = c.node.create_publisher(Image, "image", qos_profile_sensor_data)
        prompt = c.node.create_publisher(String, "prompt", 10)
        got: list[SegmentationResult] = []
        c.node.create_subscription(SegmentationResult, "segmentation", got.append, 10)
        frame = render_frame(5, 1, 320, 240)
        msg = rgb8_to_compressed(frame.rgb, "png")
        msg.header.stamp.sec, msg.header.frame_id = 42, "cam"
        assert c.spin_until(lambda: pub.get_subscription_count() > 0, 20)
        assert raw.get_subscription_count() == 0, "with use_compressed the raw topic must not be subscribed"
        end = time.monotonic() + 60
        sent_prompt = False
        while time.monotonic() < end and not got:
            pub.publish(msg)
            if not sent_prompt and prompt.get_subscription_count() > 0:
                prompt.publish(String(data="green square"))
                sent_prompt = True
            c.spin_until(lambda: bool(got), 0.1)
        assert got and got[0].header.stamp.sec == 42 and got[0].header.frame_id == "cam", proc.output[-2000:]
        bad = CompressedImage(format="jpeg", data=b"\xff\xd8 not a jpeg")
        pub.publish(bad)
        assert proc.wait_for_log("dropped a frame", 10), proc.output[-2000:]
        for _ in range(5):  # keep the worker busy, then interrupt it
            pub.publish(msg)
            c.spin_until(lambda: False, 0.05)
    finally:
        c.close()
        took = proc.stop(sig=signal.SIGINT)
    assert took < 2.0, f"SIGINT took {took:.2f} s"
    assert proc.proc.returncode == 0, proc.output[-2000:]
    assert np.isfinite(took)


def test_a_camera_whose_qos_cannot_match_is_named_with_the_parameter_to_change(model_dir: str) -> None:
    """A best-effort camera never reaches a node asking for reliable frames: the node must say so, and how to fix
    it (image_qos), instead of waiting silently (ros_anchors.md: the anchors' most common silent failure)."""
    with active_node(_ns(), {"model_path": model_dir, "device": "cpu", "image_qos": "reliable"}, "qos_client") as (c, proc):
        pub = c.node.create_publisher(Image, "image", qos_profile_sensor_data)  # best effort, as camera drivers
        frame = render_frame(5, 2, 160, 120)
        end = time.monotonic() + 30
        while time.monotonic() < end and not any("incompatible QoS" in line for line in proc.lines):
            pub.publish(numpy_to_image(frame.rgb, "rgb8"))
            c.spin_until(lambda: False, 0.2)
        assert proc.wait_for_log("incompatible QoS", 1), proc.output[-2000:]
        assert proc.wait_for_log("set image_qos to match the driver", 1), proc.output[-2000:]
        assert proc.wait_for_log("no frame received", 15), proc.output[-2000:]  # and the frames never arrive
        assert proc.proc.poll() is None
