"""The `pixel_sail` lifecycle node: camera frames + text prompts / clicks → masks, descriptions and 3D.

Threading model (why it looks like this): camera callbacks only store the newest frame in a single slot;
one worker thread runs the model on whatever is newest when it is free, so latency stays bounded and a slow
model drops frames (counted) instead of queueing them. Clicks and `segment` service calls go to the same
worker (the service's callback is a coroutine that awaits the worker's answer), so only the worker ever runs
the model and everything else is spun by one single-threaded executor. Why not rclpy's MultiThreadedExecutor:
spinning it beside the worker made the engine's median a quarter slower on a 2-core CPU and gave it stalls
of up to 2 s (docs/PERFORMANCE.md, one executor thread; scripts/executor_probe.py). The model is loaded once in
`configure` and freed in `deactivate`.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np
import rclpy
import rclpy.subscription
from rclpy.task import Future
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PointStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, DurabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String

try:  # Jazzy and newer
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks  # type: ignore[no-redef]

from pixel_sail_ros.msg import SegmentationResult
from pixel_sail_ros.srv import Segment

from . import conversions, image_conversion, point_cloud, visualization
from .parameters import PARAMETERS, ParamSpec
from .scheduling import ClickRequest, Frame, RollingStats, SequenceGaps, ServiceCall, StampedBuffer, WorkQueue
from .transforms import TransformBuffer, TransformError

NODE_NAME = "pixel_sail"


def stamp_seconds(header: Any) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    desc = spec.description + (f" One of: {', '.join(spec.choices)}." if spec.choices else "")
    d = ParameterDescriptor(description=desc, read_only=False)
    if spec.min_value is not None and isinstance(spec.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.min_value), to_value=float(spec.max_value), step=0.0)]
    elif spec.min_value is not None and isinstance(spec.default, int) and not isinstance(spec.default, bool):
        d.integer_range = [IntegerRange(from_value=int(spec.min_value), to_value=int(spec.max_value), step=1)]
    return d


def log_warning(logger: Any, message: str) -> None:
    """`warning` where the distro has it (Jazzy+ deprecate `warn`), `warn` on Humble."""
    (getattr(logger, "warning", None) or logger.warn)(message)


class ThrottledLogger:
    """At most one log line per key per period, with the count of suppressed repeats (nothing is silent)."""

    def __init__(self, logger: Any, period_s: float = 2.0) -> None:
        self._logger = logger
        self._period = period_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: str, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self._period:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            n = self._suppressed.pop(key, 0)
            self._last[key] = now
        suffix = f" ({n} more like this suppressed)" if n else ""
        if level == "warn":
            log_warning(self._logger, message + suffix)
        else:
            getattr(self._logger, level)(message + suffix)


class RosLogHandler(logging.Handler):
    """The library's Python log records (``pixel_sail_ros.*``: e.g. the engine turning off a compilation that failed)
    into the node's ROS logger, so they reach /rosout and the launch log like the node's own lines."""

    def __init__(self, logger: Any) -> None:
        super().__init__(logging.INFO)
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        message = f"{record.name}: {record.getMessage()}"
        if record.levelno >= logging.ERROR:
            self._logger.error(message)
        elif record.levelno >= logging.WARNING:
            log_warning(self._logger, message)
        else:
            self._logger.info(message)


def guarded(callback):
    """Run a subscription callback so nothing a sender did can raise into rclpy's executor (and end the node):
    bad input (ValueError) is counted and logged by the callback itself; anything else is counted and logged here.
    A callback written as ``(self, msg, info)`` keeps that arity, so rclpy still passes it the message info."""

    def run(self: "PixelSailNode", *args: Any) -> None:
        try:
            callback(self, *args)
        except Exception as exc:  # noqa: BLE001 - the node must keep running
            self._count_error(callback.__name__, f"{callback.__name__}: unexpected {type(exc).__name__}: {exc}")

    if len(inspect.signature(callback).parameters) == 3:
        def wrapper(self: "PixelSailNode", msg: Any, info: Any) -> None:
            run(self, msg, info)
    else:
        def wrapper(self: "PixelSailNode", msg: Any) -> None:  # type: ignore[misc]
            run(self, msg)

    wrapper.__name__ = callback.__name__
    wrapper.__doc__ = callback.__doc__
    return wrapper


class PixelSailNode(LifecycleNode):
    """Lifecycle node `pixel_sail`; topic names are relative so namespaces and remaps move them."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        self._queue = WorkQueue()
        self._worker: Optional[threading.Thread] = None
        self._prompt = ""
        self._prompt_lock = threading.Lock()
        self._depth = StampedBuffer[Any](size=15)
        self._transport_gaps = SequenceGaps()
        self._camera_info: Optional[CameraInfo] = None
        self._tf = TransformBuffer()
        self._throttle = ThrottledLogger(self.get_logger())
        self._latency = RollingStats()
        self._engine_time = RollingStats()
        # Where a frame's latency goes, stage by stage (diagnostics): the wire, the executor, the queue, the model,
        # and the result's way out. A frame's age at the subscriber is their sum plus the hop back.
        self._transport_in = RollingStats()  # the publisher's source timestamp → rmw received it here
        self._callback_delay = RollingStats()  # rmw received it → the executor ran the image callback
        self._queue_wait = RollingStats()  # a prompt frame's arrival → the model starting on it
        self._after_engine = RollingStats()  # the model done → the segmentation result published
        self.errors = 0
        self.results = 0
        self.frames_rejected = 0  # image messages that could not be decoded (counted in errors too)
        self._last_error = ""
        self._last_rate_time = 0.0
        self._subs: list[Any] = []
        self._service = None
        self._pubs: dict[str, Any] = {}
        self._timers: list[Any] = []
        self._device_desc = "not loaded"
        self._memory_desc = "off"  # keep_freed_memory: yes | no: why | off
        self._warmup_desc = "off"  # the last configure's warm-up: WxH in S s | off
        self._first_frame_warned = False
        self._log_handler = RosLogHandler(self.get_logger())
        logging.getLogger("pixel_sail_ros").addHandler(self._log_handler)

    def destroy_node(self) -> Any:
        logging.getLogger("pixel_sail_ros").removeHandler(self._log_handler)
        return super().destroy_node()

    # ------------------------------------------------------------------ parameters
    def p(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _on_set_parameters(self, params: Sequence[Any]) -> SetParametersResult:
        from .parameters import BY_NAME

        for prm in params:
            spec = BY_NAME.get(prm.name)
            if spec is None:
                continue
            if spec.choices and prm.value not in spec.choices:
                return SetParametersResult(successful=False, reason=f"{prm.name} must be one of {list(spec.choices)}, got {prm.value!r}")
            if spec.read_only and self._engine is not None and prm.value != self.p(prm.name):
                return SetParametersResult(successful=False,
                                           reason=f"{prm.name} takes effect at configure: deactivate and clean up the node first")
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.p("target_frame") and not self.p("use_depth"):
            log_warning(self.get_logger(), "target_frame is set but use_depth is false: there are no 3D outputs to move")
        if self.p("target_frame") and self.p("use_depth"):
            try:
                import tf2_msgs.msg  # noqa: F401 - a missing package fails configure, not the first frame
            except ImportError as exc:
                self.get_logger().error(f"configure failed: target_frame needs the tf2_msgs package ({exc})")
                return TransitionCallbackReturn.FAILURE
        try:
            self._load_engine()
        except Exception as exc:  # a bad path, corrupt checkpoint or bad device must not crash the process
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._pubs = {
            "segmentation": self.create_lifecycle_publisher(SegmentationResult, "segmentation", 10),
            "mask": self.create_lifecycle_publisher(Image, "mask", 10),
            "description": self.create_lifecycle_publisher(String, "description", 10),
            "debug_image": self.create_lifecycle_publisher(Image, "debug_image", 2),
        }
        if self.p("use_depth"):
            from sensor_msgs.msg import PointCloud2
            from visualization_msgs.msg import MarkerArray

            self._pubs["markers"] = self.create_lifecycle_publisher(MarkerArray, "markers", 10)
            self._pubs["object_cloud"] = self.create_lifecycle_publisher(PointCloud2, "object_cloud", 2)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # configure to cleanup, not activate to deactivate: a call waiting in the worker's queue at deactivate is
        # answered after deactivate returns, through this service; an inactive node answers at once that it is.
        # A group of its own that lets calls overlap: a waiting call must block neither the next call nor the
        # node's other callbacks (rclpy counts a coroutine as running in its group until it returns).
        self._service = self.create_service(Segment, "segment", self._on_segment,
                                            callback_group=ReentrantCallbackGroup())
        self._timers.append(self.create_timer(self.p("diagnostics_period_s"), self._publish_diagnostics))
        self._timers.append(self.create_timer(5.0, self._check_input_alive))
        self.get_logger().info(f"configured: model {self._model_desc} on {self._device_desc}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._engine is None:
            try:
                self._load_engine()
            except Exception as exc:
                self.get_logger().error(f"activate failed: {exc}")
                return TransitionCallbackReturn.FAILURE
        self._create_inputs()
        self._queue.restart()
        self._queue.set_prompt_active(bool(self._prompt))
        self._worker = threading.Thread(target=self._work_loop, name="pixel_sail_worker", daemon=True)
        self._worker.start()
        self._activated_at = time.monotonic()
        self.get_logger().info("active: waiting for frames on '%s'" % self._image_topic())
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._destroy_inputs()
        self._release_engine()
        self.get_logger().info("deactivated: model released")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._destroy_inputs()
        self._release_engine()
        self._tf = TransformBuffer()  # a reconfigured node may face another TF tree (/tf_static is re-sent to it)
        for pub in self._pubs.values():
            self.destroy_publisher(pub)
        self._pubs = {}
        for t in self._timers:
            self.destroy_timer(t)
        self._timers = []
        if self._service is not None:
            self.destroy_service(self._service)
            self._service = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._release_engine()
        return TransitionCallbackReturn.SUCCESS

    def _load_engine(self) -> None:
        from pixel_sail_ros.engine import PixelSailEngine

        path = self.p("model_path") or None
        device = self.p("device")
        if self.p("keep_freed_memory"):
            from pixel_sail_ros.allocator import keep_freed_memory

            why_not = keep_freed_memory()
            self._memory_desc = f"no: {why_not}" if why_not else "yes"
            if why_not:
                log_warning(self.get_logger(), f"keep_freed_memory: not applied ({why_not})")
        if self.p("num_threads") > 0:
            import torch

            torch.set_num_threads(self.p("num_threads"))
        t0 = time.monotonic()
        engine = PixelSailEngine.from_pretrained(path, device=device, dtype=self.p("dtype"), decoding=self.p("decoding"),
                                                 compile_image=self.p("compile_image"))
        self.get_logger().info(f"model loaded in {time.monotonic() - t0:.2f} s")
        self._warm_up(engine)
        self._engine = engine
        self._device_desc = f"{engine.device} ({str(engine.dtype).replace('torch.', '')})"
        self._model_desc = path or "bundled shapesref_tiny"
        if device == "auto" and str(engine.device) == "cpu":
            log_warning(self.get_logger(), "device:=auto found no usable CUDA GPU: running on the CPU")
        self._suggest_bf16(engine)
        if engine.compile_image:
            self.get_logger().info("compile_image: the first frame of each image size other than the warm-up's "
                                   "compiles the image passes (tens of seconds on a small CPU)")

    def _warm_up(self, engine: Any) -> None:
        """Answer a synthetic frame of the camera's size (warmup_width x warmup_height) before going active; a
        model that cannot fails configure, and the engine is closed."""
        width, height = self.p("warmup_width"), self.p("warmup_height")
        if not (width and height):
            self._warmup_desc = "off"
            return
        if engine.compile_image or engine.decoding == "compiled":
            self.get_logger().info(f"warming up at {width}x{height}: compiling (tens of seconds on a small CPU)")
        try:
            seconds = engine.warm_up(width, height)
        except Exception as exc:
            engine.close()
            raise RuntimeError(f"the warm-up frame ({width}x{height}) failed: {type(exc).__name__}: {exc}") from exc
        self._warmup_desc = f"{width}x{height} in {seconds:.2f} s"
        self.get_logger().info(f"warmed up: {self._warmup_desc}")

    def _suggest_bf16(self, engine: Any) -> None:
        """On a CPU with fast bfloat16 products, say once that dtype:=bfloat16 is faster (float32 stays the
        default: the bundled model's recorded accuracy is float32's)."""
        import torch

        from pixel_sail_ros.cpu_features import fast_bf16_flags

        if engine.device.type != "cpu" or engine.dtype != torch.float32 or self.p("dtype") != "auto":
            return
        flags = fast_bf16_flags()
        if flags:
            self.get_logger().info(
                f"this CPU has {' and '.join(flags)}: dtype:=bfloat16 answers faster (bundled model, 640x480, 2-vCPU "
                "AMX VM: 18 against 25-28 ms; held-out gIoU 0.854 against 0.856; README Performance)")

    def _release_engine(self) -> None:
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is None:
            return
        engine.close()  # drops the weights and empties the CUDA cache
        del engine
        gc.collect()
        self._device_desc = "released"

    # ------------------------------------------------------------------ inputs
    def _image_topic(self) -> str:
        return "image/compressed" if self.p("use_compressed") else "image"

    def _image_qos(self) -> QoSProfile:
        reliable = self.p("image_qos") == "reliable"
        # Depth 5, not 1: the callback only moves the newest frame into the single slot, so nothing queues in
        # the node, but a lagging executor must not lose frames inside rmw before they are counted.
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=5,
            reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.VOLATILE,
        )

    def _qos_warning(self, topic: str):
        def cb(event: Any) -> None:
            self._throttle.log(
                "warn", f"qos-{topic}",
                f"'{topic}': a publisher with incompatible QoS ({event.last_policy_kind}) was found; "
                f"this node subscribes with image_qos={self.p('image_qos')!r} — set image_qos to match the driver",
            )

        return SubscriptionEventCallbacks(incompatible_qos=cb)

    def _create_inputs(self) -> None:
        qos = self._image_qos()
        topic = self._image_topic()
        msg_type = CompressedImage if self.p("use_compressed") else Image
        self._transport_gaps.reset_streams()  # what was sent while unsubscribed was not lost in transport
        # Newer rclpy passes message info (for the transport-loss count); Humble's calls with the message alone.
        on_image = self._on_image if _RCLPY_MESSAGE_INFO else (lambda msg: self._on_image(msg, None))
        self._subs = [
            self.create_subscription(msg_type, topic, on_image, qos,
                                     event_callbacks=self._qos_warning(topic)),
            self.create_subscription(String, "prompt", self._on_prompt, 10),
            self.create_subscription(PointStamped, "click", self._on_click, 10),
        ]
        if self.p("use_depth"):
            self._subs += [
                self.create_subscription(Image, "depth", self._on_depth, qos,
                                         event_callbacks=self._qos_warning("depth")),
                self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, qos),
            ]
            if self.p("target_frame"):
                self._subs += self._tf_subscriptions()

    def _tf_subscriptions(self) -> list[Any]:
        """/tf and /tf_static (absolute, as tf2 listeners use them), with tf2's QoS; the executor keeps taking
        transforms while the worker waits for one."""
        from tf2_msgs.msg import TFMessage

        dynamic = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        static = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
        return [self.create_subscription(TFMessage, "/tf", self._on_tf, dynamic),
                self.create_subscription(TFMessage, "/tf_static", self._on_tf_static, static)]

    def _destroy_inputs(self) -> None:
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []

    def _decode(self, msg: Any) -> np.ndarray:
        if isinstance(msg, CompressedImage):
            return image_conversion.compressed_to_rgb8(msg, max_pixels=self.p("max_image_pixels"))
        return image_conversion.to_rgb8(msg, max_pixels=self.p("max_image_pixels"))

    @guarded
    def _on_image(self, msg: Any, info: Any) -> None:
        self._time_arrival(info, time.time_ns())
        self._count_transport_loss(info)
        try:
            rgb = self._decode(msg)
        except ValueError as exc:
            self.frames_rejected += 1
            self._count_error("image", f"dropped a frame on '{self._image_topic()}': {exc}")
            return
        frame = Frame(rgb=rgb, header=msg.header)
        # Paired on arrival, not when the worker gets to it: after a slow job the depth buffer has moved on.
        frame.depth = self._paired_depth(frame)
        self._queue.put_frame(frame)

    def _time_arrival(self, info: Any, now_ns: int) -> None:
        """Time the frame's way here from rmw's timestamps (system clock, ns): the wire (source → received; the
        sender's clock, so only meaningful with clocks in sync, as on one machine) and the executor's delay
        (received → this callback). Without message info (Humble) neither is measured."""
        if not isinstance(info, dict):
            return
        received, source = info.get("received_timestamp") or 0, info.get("source_timestamp") or 0
        if received:
            self._callback_delay.add((now_ns - received) / 1e9)
            if source:
                self._transport_in.add((received - source) / 1e9)

    def _count_transport_loss(self, info: Any) -> None:
        """Frames the publisher sent that never reached this callback (best-effort reader overwritten or network
        loss) show up as gaps in its sequence numbers: count them, so no frame disappears uncounted."""
        gid = (info.get("publisher_gid") or {}).get("data") if isinstance(info, dict) else None
        seq = info.get("publication_sequence_number") if isinstance(info, dict) else None
        lost = self._transport_gaps.observe(bytes(gid) if gid is not None else None, seq)
        if lost:
            self._throttle.log(
                "warn", "transport-loss",
                f"{self._transport_gaps.lost} frame(s) on '{self._image_topic()}' so far were lost before reaching "
                "this node (best-effort QoS under load, or a network too slow for the frame size); they are counted "
                "in /diagnostics as frames_lost_in_transport")

    @guarded
    def _on_prompt(self, msg: String) -> None:
        text = msg.data
        if text.strip():
            try:
                text = conversions.validate_prompt(text, self.p("max_prompt_chars"))
            except ValueError as exc:
                self._count_error("prompt", f"prompt rejected, continuous segmentation stopped: {exc}")
                text = ""  # the sender meant to replace the old prompt: never keep segmenting that one
        else:
            text = ""
        with self._prompt_lock:
            self._prompt = text
        if text and self._queue.latest_frame() is None:
            self._throttle.log("warn", "prompt-no-frame",
                               f"prompt {text!r} stored, but no frame has arrived on '{self._image_topic()}' yet")
        if text or not msg.data.strip():
            self.get_logger().info(f"prompt set to {text!r}" if text else "prompt cleared: continuous segmentation stopped")
        self._queue.set_prompt_active(bool(text))

    @guarded
    def _on_click(self, msg: PointStamped) -> None:
        try:
            frame = self._latest_frame()
        except ValueError as exc:
            self._count_error("click", f"click ignored: {exc}")
            return
        h, w = frame.rgb.shape[:2]
        try:
            conversions.validate_points([(msg.point.x, msg.point.y)], w, h)
        except ValueError as exc:
            self._count_error("click", f"click rejected: {exc}")
            return
        if not self._queue.put_click(ClickRequest(msg.point.x, msg.point.y, frame)):
            self._count_error("click", f"click rejected: {self._queue.max_clicks} clicks are already waiting")

    @guarded
    def _on_depth(self, msg: Image) -> None:
        try:
            depth = image_conversion.depth_to_meters(msg, max_pixels=self.p("max_image_pixels"))
        except ValueError as exc:
            self._count_error("depth", f"dropped a depth frame: {exc}")
            return
        stamp = stamp_seconds(msg.header)
        self._depth.put(stamp, depth)
        latest = self._queue.latest_frame()  # a colour frame that arrived before its depth image
        if (latest is not None and latest.depth is None
                and abs(stamp_seconds(latest.header) - stamp) <= self.p("depth_tolerance_s")):
            latest.depth = depth

    @guarded
    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    @guarded
    def _on_tf(self, msg: Any) -> None:
        self._add_transforms(msg, static=False)

    @guarded
    def _on_tf_static(self, msg: Any) -> None:
        self._add_transforms(msg, static=True)

    def _add_transforms(self, msg: Any, static: bool) -> None:
        for t in msg.transforms:
            tr, q = t.transform.translation, t.transform.rotation
            try:
                self._tf.add(t.header.frame_id, t.child_frame_id, stamp_seconds(t.header), (tr.x, tr.y, tr.z),
                             (q.x, q.y, q.z, q.w), static=static)
            except ValueError as exc:
                topic = "/tf_static" if static else "/tf"
                self._count_error("tf-input", f"ignored a transform on {topic} ('{t.header.frame_id}' -> "
                                              f"'{t.child_frame_id}'): {exc}")

    def _check_input_alive(self) -> None:
        if self._queue.frames.received == 0 and self._subs:
            topic = self.resolve_topic_name(self._image_topic())
            pubs = self.count_publishers(topic)
            hint = ("no publisher exists: check the remap" if pubs == 0 else
                    f"{pubs} publisher(s) exist: check image_qos ({self.p('image_qos')}) and the encoding")
            self._throttle.log("warn", "no-frames", f"no frame received on '{topic}' yet; {hint}")

    def _count_error(self, key: str, message: str) -> None:
        self.errors += 1
        self._last_error = message
        self._throttle.log("warn", key, message)

    # ------------------------------------------------------------------ work
    def _stop_worker(self, timeout: float = 30.0) -> None:
        self._queue.stop()
        if self._worker is not None:
            self._worker.join(timeout=timeout)  # a daemon thread: at process exit it dies with it
            self._worker = None
        for call in self._queue.drain_calls():  # their clients are waiting: answer, never leave them hanging
            call.future.set_result((None, "the node was deactivated before this request ran"))

    def _work_loop(self) -> None:
        while not self._queue.stopped:
            self._queue.frame_wait = self.p("frame_wait_ms") / 1000.0
            job = self._queue.next_job(timeout=0.5)
            if job is None:
                continue
            try:
                if isinstance(job, ServiceCall):
                    self._run_call(job)
                elif isinstance(job, ClickRequest):
                    self._run_click(job)
                else:
                    self._run_prompt(job)
            except Exception as exc:  # the worker must survive anything the engine throws
                self._engine_failed(exc)

    def _run_prompt(self, frame: Frame) -> None:
        rate = self.p("max_rate_hz")
        if rate > 0:
            wait = self._last_rate_time + 1.0 / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                frame = self._queue.swap_for_newer(frame)  # the newest frame wins, also after a pause
        self._last_rate_time = time.monotonic()
        with self._prompt_lock:
            prompt = self._prompt
        if not prompt:
            self._queue.count_skipped()
            return
        self._queue_wait.add(time.monotonic() - frame.received)
        self._answer(frame, text=prompt, points=[], boxes=[], describe=False)

    def _run_call(self, call: ServiceCall) -> None:
        try:
            result = self._answer(call.frame, text=call.text, points=call.points, boxes=call.boxes,
                                  describe=call.describe)
        except Exception as exc:  # engine failures become an answer, never a dead node
            self._engine_failed(exc)
            call.future.set_result((None, self._last_error))
            return
        call.future.set_result((result, None))

    def _run_click(self, click: ClickRequest) -> None:
        self._answer(click.frame, text="", points=[(click.x, click.y)], boxes=[], describe=self.p("describe_clicks"))

    def _engine_failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._last_error = f"inference failed: {type(exc).__name__}: {exc}"
        self._throttle.log("error", "engine", self._last_error)
        if "out of memory" in str(exc).lower():
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def _infer(self, rgb: np.ndarray, text: str, points: list, boxes: list, describe: bool) -> Any:
        with self._engine_lock:
            if self._engine is None:
                raise RuntimeError("the model is not loaded (node inactive)")
            # Parameters the user may change at run time apply to the next request.
            self._engine.mask_threshold = self.p("mask_threshold")
            self._engine.max_new_tokens = self.p("max_new_tokens")
            self._engine.speculative = self.p("speculative_decoding")
            self._engine.fuse_first_turn = self.p("fuse_first_turn")
            return self._engine.segment(rgb, text=text, points=points or None, boxes=boxes or None, describe=describe)

    def _answer(self, frame: Frame, text: str, points: list, boxes: list, describe: bool) -> SegmentationResult:
        """Run the model on one frame and publish every output; returns the SegmentationResult."""
        out = self._infer(frame.rgb, text, points, boxes, describe)
        engine_done = time.monotonic()
        depth = frame.depth if frame.depth is not None else self._paired_depth(frame)  # it may have come late
        positions, num_points, cloud = self._lift_3d(frame, depth, out.masks)
        result = conversions.build_segmentation_result(
            header=frame.header, prompt=text, points=points, description=out.description,
            masks=out.masks, scores=out.scores, labels=out.labels, positions=positions,
            inference_seconds=out.seconds, answer=" | ".join(out.answers), num_points=num_points,
        )
        self._publish(frame, result, out, engine_done, *self._in_target_frame(frame, positions, cloud))
        self.results += 1
        self._latency.add(time.monotonic() - frame.received)
        self._engine_time.add(out.seconds)
        return result

    def _paired_depth(self, frame: Frame) -> Optional[np.ndarray]:
        """The depth image (metres) whose stamp is closest to the frame's, within depth_tolerance_s."""
        if not self.p("use_depth"):
            return None
        return self._depth.closest(stamp_seconds(frame.header), self.p("depth_tolerance_s"))

    def _lift_3d(self, frame: Frame, depth: Optional[np.ndarray],
                 masks: np.ndarray) -> tuple[Optional[list], Optional[list], Optional[np.ndarray]]:
        """3D centroid and valid-depth count per mask, and the masked points, from the depth paired by stamp."""
        if not self.p("use_depth") or len(masks) == 0:
            return None, None, None
        info = self._camera_info
        h, w = frame.rgb.shape[:2]
        if info is None or depth is None:
            missing = "camera_info" if info is None else f"depth image within {self.p('depth_tolerance_s')} s"
            self._throttle.log("warn", "depth-missing", f"no {missing} for the frame at {stamp_seconds(frame.header):.3f}: 3D skipped")
            return None, None, None
        if depth.shape != (h, w):
            self._count_error("depth-size", f"depth is {depth.shape[1]}x{depth.shape[0]} but the image is {w}x{h}: "
                                            "use depth registered to the colour camera; 3D skipped")
            return None, None, None
        try:
            K = point_cloud.validate_camera_info(info, w, h)
        except ValueError as exc:
            self._count_error("camera-info", f"camera_info rejected: {exc}; 3D skipped")
            return None, None, None
        positions = [point_cloud.mask_centroid_3d(depth, K, m, min_points=self.p("min_depth_points")) for m in masks]
        num_points = [int(point_cloud.valid_depth_mask(depth, m).sum()) for m in masks]
        cloud = None
        if self.p("publish_cloud") and self._pubs.get("object_cloud") is not None:
            union = np.any(masks, axis=0)
            cloud = point_cloud.deproject(depth, K, union)
        return positions, num_points, cloud

    def _in_target_frame(self, frame: Frame, positions: Optional[list], cloud: Optional[np.ndarray]
                         ) -> tuple[Header, Optional[list], Optional[np.ndarray], np.ndarray]:
        """(header, positions, cloud, up direction) for markers and object_cloud: the image's own frame, or with
        target_frame set, moved into it with TF at the image's stamp (never the latest transform: a camera on an
        arm moves). Without the transform within tf_timeout_s, both are published empty and the error counted."""
        up = np.array([0.0, -1.0, 0.0])  # -y is up in an optical frame
        target = self.p("target_frame")
        if not target or "markers" not in self._pubs:
            return frame.header, positions, cloud, up
        header = Header(stamp=frame.header.stamp, frame_id=target)
        if positions is None:
            return header, None, None, up
        source, stamp = frame.header.frame_id, stamp_seconds(frame.header)
        try:
            if not source:
                raise TransformError("the image header has no frame_id")
            tf = self._tf.wait_for(target, source, stamp, self.p("tf_timeout_s"))
        except TransformError as exc:
            self._count_error("tf", f"markers and object_cloud in '{target}' skipped for the frame at {stamp:.3f}: "
                                    f"no transform from '{source}' within tf_timeout_s={self.p('tf_timeout_s')}: {exc}")
            return header, None, None, up
        moved = [None if p is None else tf.apply(np.asarray(p, dtype=np.float64)) for p in positions]
        return header, moved, (tf.apply(cloud) if cloud is not None else None), tf.rotation @ up

    def _publish(self, frame: Frame, result: SegmentationResult, out: Any, engine_done: float, header_3d: Header,
                 positions: Optional[list], cloud: Optional[np.ndarray], up: np.ndarray) -> None:
        pubs = self._pubs
        pubs["segmentation"].publish(result)
        self._after_engine.add(time.monotonic() - engine_done)
        if pubs["mask"].get_subscription_count() > 0:  # a full-size image per frame: only built for a reader
            label = visualization.label_image(out.masks, frame.rgb.shape[:2], scores=out.scores)
            pubs["mask"].publish(image_conversion.numpy_to_image(label, "mono8", frame.header))
        if out.description:
            pubs["description"].publish(String(data=out.description))
        if pubs["debug_image"].get_subscription_count() > 0:
            over = visualization.overlay(frame.rgb, out.masks, out.labels, out.scores)
            pubs["debug_image"].publish(image_conversion.numpy_to_image(over, "rgb8", frame.header))
        # With 3D on, every result replaces the previous markers and cloud, also with nothing to show (no object,
        # or no depth for this frame): an RViz display or a planner never keeps a stale object.
        if "markers" in pubs:
            shown = positions if positions is not None else [None] * len(out.labels)
            pubs["markers"].publish(visualization.make_markers(header_3d, shown, out.labels, ns=NODE_NAME, up=up))
        if "object_cloud" in pubs:
            points = cloud if cloud is not None else np.zeros((0, 3), np.float32)
            pubs["object_cloud"].publish(point_cloud.make_point_cloud2(points, header_3d))

    # ------------------------------------------------------------------ service
    async def _on_segment(self, req: Segment.Request, resp: Segment.Response) -> Segment.Response:
        """Validate here, run in the worker: while it runs, this coroutine waits and the executor keeps spinning."""
        try:
            if self._worker is None:
                raise ValueError("the node is not active: activate it first (lifecycle transition 'activate')")
            frame = self._service_frame(req)
            h, w = frame.rgb.shape[:2]
            text = conversions.validate_prompt(req.text, self.p("max_prompt_chars")) if req.text.strip() else ""
            points = conversions.validate_points([(p.x, p.y) for p in req.points], w, h)
            boxes = conversions.validate_boxes(
                [(b.x_offset, b.y_offset, b.x_offset + b.width, b.y_offset + b.height) for b in req.boxes], w, h)
            if not text and not points and not boxes:
                raise ValueError("nothing to segment: give a text, points or boxes")
            most = self._engine.processor.num_visual_prompts  # loaded while the worker runs (checked above)
            if len(points) + len(boxes) > most:
                raise ValueError(f"{len(points)} points and {len(boxes)} boxes: this model takes at most {most} together")
        except Exception as exc:  # noqa: BLE001 - a bad request is an answer, never a dead node
            text = str(exc) if isinstance(exc, ValueError) else f"malformed request ({type(exc).__name__}: {exc})"
            resp.success, resp.message = False, text
            self.errors += 1
            self._last_error = f"segment request rejected: {text}"
            log_warning(self.get_logger(), self._last_error)
            return resp
        future = Future(executor=self.executor)
        future.add_done_callback(lambda _: None)  # a done callback is what makes the worker's answer wake the executor
        call = ServiceCall(frame, text, [tuple(p) for p in points], [tuple(b) for b in boxes], req.describe, future)
        if not self._queue.put_call(call):
            resp.success, resp.message = False, f"busy: {self._queue.max_calls} segment calls are already waiting"
            self._count_error("service", f"segment request rejected: {resp.message}")
            return resp
        result, error = await future
        if error is not None:
            resp.success, resp.message = False, error
            return resp
        resp.result = result
        resp.success = True
        resp.message = f"{len(resp.result.objects)} object(s)"
        return resp

    def _latest_frame(self) -> Frame:
        """The newest camera frame, for a request that brings no image; ValueError if there is none or it is stale
        (older than max_frame_age_s: a grasp must not act on where things were before the camera stopped)."""
        frame = self._queue.latest_frame()
        topic = self.resolve_topic_name(self._image_topic())
        if frame is None:
            raise ValueError(f"no frame has arrived on '{topic}' yet")
        age, limit = time.monotonic() - frame.received, self.p("max_frame_age_s")
        if limit > 0 and age > limit:
            raise ValueError(f"the latest frame on '{topic}' arrived {age:.1f} s ago, more than max_frame_age_s="
                             f"{limit:g}: is the camera still publishing?")
        return frame

    def _service_frame(self, req: Segment.Request) -> Frame:
        if req.image.height == 0:
            return self._latest_frame()
        rgb = image_conversion.to_rgb8(req.image, max_pixels=self.p("max_image_pixels"))
        return Frame(rgb=rgb, header=req.image.header)

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        st = DiagnosticStatus(name=f"{self.get_name()}: inference", hardware_id=self._device_desc)
        st.level = DiagnosticStatus.OK
        st.message = "ok"
        if self._engine is None:
            st.level, st.message = DiagnosticStatus.WARN, "model not loaded (inactive)"
        elif self._last_error:
            st.level, st.message = DiagnosticStatus.ERROR if self._last_error.startswith("inference failed") else DiagnosticStatus.WARN, self._last_error
        values = {
            "device": self._device_desc,
            "model": getattr(self, "_model_desc", ""),
            "keep_freed_memory": self._memory_desc,
            "warmup": self._warmup_desc,
            "results": self.results,
            "errors": self.errors,
            "frames_received": self._queue.frames.received,
            "frames_dropped": self._queue.frames.dropped,
            "frames_rejected": self.frames_rejected,
            "frames_lost_in_transport": self._transport_gaps.lost,
            "transport_loss_counted": _COUNTED[self._transport_gaps.supported],
            "clicks_rejected": self._queue.clicks_rejected,
            "segment_calls_rejected": self._queue.calls_rejected,
            "output_rate_hz": round(self._latency.rate_hz(), 3),
            "latency_ms_p50": round(1000 * self._latency.percentile(50), 2),
            "latency_ms_p95": round(1000 * self._latency.percentile(95), 2),
            "engine_ms_p50": round(1000 * self._engine_time.percentile(50), 2),
            **{f"{name}_ms_p{q}": round(1000 * stats.percentile(q), 2)
               for name, stats in (("transport_in", self._transport_in), ("callback_delay", self._callback_delay),
                                   ("queue_wait", self._queue_wait), ("after_engine", self._after_engine))
               for q in (50, 95)},
            "prompt": self._prompt,
        }
        if self._engine is not None:
            drafts = dict(self._engine.draft_stats)
            values["draft_tokens_accepted"] = f"{drafts['accepted_tokens']} of {drafts['drafted_tokens']}"
            values["decoder_passes_per_answer"] = round(drafts["passes"] / max(drafts["answers"], 1), 2)
            values["answers_from_the_image_pass"] = f"{drafts['with_prefix']} of {drafts['answers']}"
        if self.p("target_frame"):
            values["target_frame"] = self.p("target_frame")
            values["tf_frames_known"] = len(self._tf.frames())
        st.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(arr)
        self._last_error = ""


_RCLPY_MESSAGE_INFO = hasattr(rclpy.subscription.Subscription, "CallbackType")  # False on Humble

#: Whether frames_lost_in_transport means anything: an rmw without publication sequence numbers leaves it at 0.
_COUNTED = {None: "not yet (no frame received)", True: "yes",
            False: "no: this rclpy/rmw gives no publication sequence numbers, losses are not seen"}


def main(args: Optional[list[str]] = None) -> int:
    """Entry point of `pixel_sail_node`: configure + activate unless autostart is false, then spin."""
    rclpy.init(args=args)
    node = PixelSailNode()
    executor = SingleThreadedExecutor()  # the model runs in the node's worker thread (module docstring: why)
    executor.add_node(node)
    code = 0
    try:
        if node.p("autostart"):
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal("could not configure (see the error above); exiting")
                code = 1
            elif node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal("could not activate; exiting")
                code = 1
        if code == 0:
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node._stop_worker(timeout=1.0)  # exit within ~2 s even mid-inference
        node._release_engine()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return code


def run() -> None:
    """Console entry: everything is released above, so skip the interpreter's slow teardown of torch
    (seconds on a loaded CPU) and exit at once — SIGINT/SIGTERM must end the node within 2 s."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
