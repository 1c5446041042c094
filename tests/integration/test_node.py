"""The node end to end, started as a user starts it, with ShapesRef frames and the bundled model.

One node process serves most tests of this module (starting one costs a few seconds); tests that need
other parameters or kill the node start their own.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("pixel_sail_ros.msg", reason="interfaces not built: run `make build`")

from geometry_msgs.msg import Point, PointStamped  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.srv import DescribeParameters, ListParameters  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, RegionOfInterest  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from pixel_sail_ros.cpu_features import fast_bf16_flags  # noqa: E402
from pixel_sail_ros.msg import SegmentationResult  # noqa: E402
from pixel_sail_ros.ros.image_conversion import numpy_to_image  # noqa: E402
from pixel_sail_ros.ros.parameters import BY_NAME  # noqa: E402
from pixel_sail_ros.ros.point_cloud import mask_centroid_3d, read_points  # noqa: E402
from pixel_sail_ros.training.camera_frames import render_frame  # noqa: E402
from pixel_sail_ros.srv import Segment  # noqa: E402
from pixel_sail_ros.training import shapesref  # noqa: E402

from .node_harness import (  # noqa: E402
    Client, DiagnosticsReader, NodeProcess, a_of_b, active_node, image_msg, iou, mono8_mask, outputs_3d_for,
    parameter_setter, segment_caller,
)

SEED = 424242  # ShapesRef scenes no training run used (the bundled model trains on other seeds)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ns() -> str:
    import uuid

    return "/t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def node(ns: str, model_dir: str):
    # max_frame_age_s 30: on a loaded CI machine a test's last frame can be seconds old when it asks about it
    proc = NodeProcess(ns, {"model_path": model_dir, "use_depth": True, "device": "cpu", "max_prompt_chars": 64,
                            "max_frame_age_s": 30.0})
    assert proc.wait_for_log("active: waiting for frames", 120), proc.output
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(ns: str, node: NodeProcess):
    c = Client(ns)
    yield c
    c.close()


@pytest.fixture(scope="module")
def segment(client: Client):
    return segment_caller(client)


@pytest.fixture(scope="module")
def reference(model_dir: str):
    """The same checkpoint in this process: what the model itself answers, to hold the node's answers to."""
    from pixel_sail_ros.engine import PixelSailEngine

    engine = PixelSailEngine.from_pretrained(model_dir, device="cpu")
    yield engine
    engine.close()


def assert_same_answer(res, ref, shape: tuple[int, int]) -> None:
    """The node published exactly what the model answered: same objects in order, labels, masks, scores.

    Masks may differ in a few pixels at the threshold (the node runs its own torch threads), nothing more.
    """
    assert [o.label for o in res.objects] == ref.labels, (res.objects, ref.answers)
    assert res.description == ref.description
    for obj, mask, score in zip(res.objects, ref.masks, ref.scores):
        node_mask = mono8_mask(obj.mask)
        assert node_mask.shape == shape == mask.shape
        if mask.any() or node_mask.any():
            assert iou(node_mask, mask) >= 0.98, f"{obj.label!r}: node mask IoU vs the model's {iou(node_mask, mask):.3f}"
        assert abs(obj.score - float(score)) <= 0.02


def present_expressions(frame, k: int, rng: np.random.Generator):
    exprs = shapesref.expressions(frame.scene, rng)
    return [e for e in exprs if e.target is not None][:k], [e for e in exprs if e.target is None][:k]


def test_service_segments_referring_expressions(segment, reference, quality_model: bool) -> None:
    ious, absent_ok, absent_n = [], 0, 0
    for index in range(4):
        frame = render_frame(SEED, index)
        present, absent = present_expressions(frame, 2, np.random.default_rng(index))
        for expr in present + absent:
            resp = segment(Segment.Request(image=image_msg(frame.rgb, 100 + index), text=expr.text))
            assert resp.success, resp.message
            res = resp.result
            assert_same_answer(res, reference.segment(frame.rgb, text=expr.text), frame.rgb.shape[:2])
            assert (res.header.stamp.sec, res.header.stamp.nanosec, res.header.frame_id) == (100 + index, 5, "camera_optical")
            assert res.prompt == expr.text and res.inference_seconds > 0
            for obj in res.objects:
                assert (obj.mask.height, obj.mask.width) == frame.rgb.shape[:2] and obj.mask.encoding == "mono8"
                m = mono8_mask(obj.mask)
                ys, xs = np.nonzero(m)
                if len(xs):
                    assert (obj.bbox.x_offset, obj.bbox.y_offset) == (xs.min(), ys.min())
                    assert (obj.bbox.width, obj.bbox.height) == (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
                assert 0.0 <= obj.score <= 1.0
            if expr.target is None:
                absent_n += 1
                absent_ok += not res.objects
            else:
                pred = mono8_mask(res.objects[0].mask) if res.objects else np.zeros(frame.rgb.shape[:2], bool)
                ious.append(iou(pred, frame.masks[expr.target]))
    # Against ground truth, always: the undertrained bundled model already finds most present targets on these
    # frames (stage 4: mean IoU 0.69; a mask on the wrong object scores ~0). The stricter bars wait for the
    # issue-4 targets.
    assert np.mean(ious) >= 0.5, f"mean IoU {np.mean(ious):.2f} over {len(ious)} expressions: {ious}"
    if quality_model:
        assert np.mean(ious) >= 0.6, f"mean IoU {np.mean(ious):.2f} over {len(ious)} expressions: {ious}"
        assert absent_ok >= absent_n - 1, f"{absent_ok}/{absent_n} absent targets answered with no mask"


def test_service_click_describes_the_object(segment, reference, quality_model: bool) -> None:
    frame = render_frame(SEED, 7)
    target = int(np.argmax([m.sum() for m in frame.masks]))
    x, y = shapesref.click_point(frame.masks[target], np.random.default_rng(0))
    resp = segment(Segment.Request(image=image_msg(frame.rgb, 7), points=[Point(x=float(x), y=float(y))], describe=True))
    assert resp.success, resp.message
    assert [(p.x, p.y) for p in resp.result.points] == [(float(x), float(y))]
    assert resp.result.description.strip(), "describe=True gave no description"
    assert_same_answer(resp.result, reference.segment(frame.rgb, points=[(x, y)], describe=True), frame.rgb.shape[:2])
    if quality_model:
        obj = frame.scene.objects[target]
        words = resp.result.description.split()
        assert obj.color in words and obj.shape in words, f"{resp.result.description!r} for a {shapesref.describe(obj)}"
        assert resp.result.objects and iou(mono8_mask(resp.result.objects[0].mask), frame.masks[target]) >= 0.5


@pytest.mark.parametrize(
    "make_request, expected",
    [
        (lambda f: Segment.Request(image=image_msg(f.rgb, 1)), "nothing to segment"),
        (lambda f: Segment.Request(image=image_msg(f.rgb, 1), text="x" * 65), "long"),
        (lambda f: Segment.Request(image=image_msg(f.rgb, 1), points=[Point(x=1e6, y=3.0)]), "outside"),
        (lambda f: Segment.Request(image=image_msg(f.rgb, 1), points=[Point(x=math.nan, y=3.0)]), "finite"),
        (lambda f: Segment.Request(image=image_msg(f.rgb, 1), points=[Point(x=5.0, y=5.0)] * 16), "at most 15"),
        (lambda f: Segment.Request(image=image_msg(f.rgb, 1),
                                   boxes=[RegionOfInterest(x_offset=10, y_offset=10, width=5000, height=5)]), "outside"),
        (lambda f: Segment.Request(image=Image(height=4, width=4, encoding="rgb8", step=12, data=bytes(10)), text="red circle"),
         "data"),
        (lambda f: Segment.Request(image=Image(height=4, width=4, encoding="weird9", step=12, data=bytes(48)), text="red circle"),
         "encoding"),
    ],
    ids=["nothing", "too-long", "point-outside", "point-nan", "too-many-points", "box-outside", "truncated-image",
         "bad-encoding"],
)
def test_service_rejects_bad_requests_and_keeps_running(segment, make_request, expected: str) -> None:
    frame = render_frame(SEED, 1)
    resp = segment(make_request(frame))
    assert not resp.success and expected in resp.message.lower(), resp.message
    good = segment(Segment.Request(image=image_msg(frame.rgb, 2), text="red circle"))
    assert good.success, good.message


def test_standing_prompt_publishes_every_output_with_the_frame_header(client: Client, node: NodeProcess,
                                                                      quality_model: bool) -> None:
    n = client.node
    frame = render_frame(SEED, 3, 320, 240)
    present, _ = present_expressions(frame, 1, np.random.default_rng(3))
    expr = present[0]
    pub_img = n.create_publisher(Image, "image", qos_profile_sensor_data)
    pub_depth = n.create_publisher(Image, "depth", qos_profile_sensor_data)
    pub_info = n.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
    pub_prompt = n.create_publisher(String, "prompt", 10)
    got: dict[str, list] = {k: [] for k in ("seg", "mask", "debug", "markers", "cloud")}
    n.create_subscription(SegmentationResult, "segmentation", got["seg"].append, 10)
    n.create_subscription(Image, "mask", got["mask"].append, 10)
    n.create_subscription(Image, "debug_image", got["debug"].append, 10)
    n.create_subscription(MarkerArray, "markers", got["markers"].append, 10)
    n.create_subscription(PointCloud2, "object_cloud", got["cloud"].append, 10)
    sent: dict[int, int] = {}

    def publish_frame(i: int) -> None:
        img = image_msg(frame.rgb, 1000 + i)
        depth = numpy_to_image(frame.depth_m, "32FC1", img.header)
        info = CameraInfo(width=320, height=240, k=frame.K.reshape(-1).tolist())
        info.header = img.header
        pub_info.publish(info)
        pub_depth.publish(depth)
        pub_img.publish(img)
        sent[1000 + i] = i

    # the prompt is published once and not latched: it must not go out before the node's subscription matched
    assert client.spin_until(lambda: pub_prompt.get_subscription_count() > 0 and pub_img.get_subscription_count() > 0, 20)
    i = 0
    end = time.monotonic() + 60
    while time.monotonic() < end and not all(got.values()):
        publish_frame(i)
        if i == 3:
            pub_prompt.publish(String(data=expr.text))
        i += 1
        client.spin_until(lambda: False, 0.1)
    pub_prompt.publish(String(data=""))
    assert got["seg"], "no segmentation result under a standing prompt\n" + node.output[-3000:]
    res = got["seg"][-1]
    assert res.header.stamp.sec in sent and res.header.stamp.nanosec == 5 and res.header.frame_id == "camera_optical"
    assert res.prompt == expr.text
    label = got["mask"][-1]
    assert label.encoding == "mono8" and (label.height, label.width) == (240, 320)
    assert label.header.stamp.sec in sent
    assert got["debug"], "debug_image not published although subscribed"
    assert (got["debug"][-1].height, got["debug"][-1].width) == (240, 320)
    if res.objects:
        obj = res.objects[0]
        pred = mono8_mask(obj.mask)
        assert obj.has_position, "depth was published but no 3D position came back"
        expected = mask_centroid_3d(frame.depth_m, frame.K, pred, min_points=BY_NAME["min_depth_points"].default)
        assert np.allclose([obj.position.x, obj.position.y, obj.position.z], expected, atol=1e-3)
        markers, cloud_msg = outputs_3d_for(client, got["markers"], got["cloud"], res.header.stamp.sec, 5)
        assert markers.markers[0].action == 3 and len(markers.markers) == 3  # DELETEALL, sphere, label
        cloud = read_points(cloud_msg)
        assert len(cloud) > 0 and cloud_msg.header.frame_id == "camera_optical"
        assert np.all(np.isin(np.round(cloud[:, 2], 3), np.round(np.unique(frame.depth_m), 3)))
        if quality_model:
            assert iou(pred, frame.masks[expr.target]) >= 0.5
            assert obj.position.z == pytest.approx(float(np.median(frame.depth_m[frame.masks[expr.target]])), abs=0.15)


def test_a_result_without_3d_clears_the_previous_markers_and_cloud(client: Client, segment) -> None:
    """RViz and planners never keep a stale object: with depth on, every result replaces markers and cloud."""
    n = client.node
    markers: list = []
    clouds: list = []
    n.create_subscription(MarkerArray, "markers", markers.append, 10)
    n.create_subscription(PointCloud2, "object_cloud", clouds.append, 10)
    frame = render_frame(SEED, 5, 160, 120)
    assert segment(Segment.Request(image=image_msg(frame.rgb, 424242), text="red circle")).success  # no depth for it
    array, cloud = outputs_3d_for(client, markers, clouds, 424242, 10)
    assert [m.action for m in array.markers] == [3]  # DELETEALL only
    assert cloud.width == 0 and len(read_points(cloud)) == 0


def test_depth_of_the_wrong_size_or_unit_is_refused_with_a_reason(client: Client, node: NodeProcess, segment) -> None:
    """Depth not registered to the colour image (another size) or in no depth unit: 3D is skipped and the log says
    why; the 2D result still comes back and the node keeps running."""
    n = client.node
    pub_depth = n.create_publisher(Image, "depth", qos_profile_sensor_data)
    pub_info = n.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
    assert client.spin_until(lambda: pub_depth.get_subscription_count() > 0 and pub_info.get_subscription_count() > 0, 20)
    frame = render_frame(SEED, 4, 320, 240)
    img = image_msg(frame.rgb, 5000)
    info = CameraInfo(width=320, height=240, k=frame.K.reshape(-1).tolist())
    info.header = img.header
    pub_info.publish(info)
    pub_depth.publish(numpy_to_image(frame.depth_m[::2, ::2].copy(), "32FC1", img.header))  # 160x120
    pub_depth.publish(numpy_to_image(frame.rgb[..., 0].copy(), "mono8", image_msg(frame.rgb, 5001).header))
    client.spin_until(lambda: False, 0.5)
    target = int(np.argmax([m.sum() for m in frame.masks]))
    ys, xs = np.nonzero(frame.masks[target])
    roi = RegionOfInterest(x_offset=int(xs.min()), y_offset=int(ys.min()), width=int(np.ptp(xs) + 1),
                           height=int(np.ptp(ys) + 1))
    resp = segment(Segment.Request(image=img, boxes=[roi]))
    assert resp.success and resp.result.objects, resp.message
    assert not resp.result.objects[0].has_position
    assert node.wait_for_log("depth is 160x120 but the image is 320x240", 10), node.output[-2000:]
    assert node.wait_for_log("dropped a depth frame", 10), node.output[-2000:]
    assert node.proc.poll() is None


def test_a_rejected_prompt_stops_the_standing_one(client: Client, node: NodeProcess) -> None:
    n = client.node
    frame = render_frame(SEED, 6, 160, 120)
    pub_img = n.create_publisher(Image, "image", qos_profile_sensor_data)
    pub_prompt = n.create_publisher(String, "prompt", 10)
    results: list = []
    n.create_subscription(SegmentationResult, "segmentation", results.append, 10)
    assert client.spin_until(lambda: pub_prompt.get_subscription_count() > 0 and pub_img.get_subscription_count() > 0, 20)
    pub_prompt.publish(String(data="blue square"))

    def stream(seconds: float, first: int) -> None:
        end, i = time.monotonic() + seconds, first
        while time.monotonic() < end:
            pub_img.publish(image_msg(frame.rgb, i))
            i += 1
            client.spin_until(lambda: False, 0.1)

    stream(3.0, 20000)
    assert any(r.prompt == "blue square" for r in results), node.output[-2000:]
    pub_prompt.publish(String(data="x" * 100))  # over max_prompt_chars (64 here)
    assert node.wait_for_log("prompt rejected", 10), node.output[-2000:]
    stream(1.0, 30000)  # a frame already in the model may still be answered
    results.clear()
    stream(2.0, 40000)
    assert not [r for r in results if r.header.stamp.sec >= 40000], "the old prompt kept running"


@pytest.fixture
def fresh_depth_node(ns: str, model_dir: str):
    """A node of its own, for a test that asks about "the latest frame": on the shared node a frame that an
    earlier test published can still be delivered late (best effort on a loaded CI machine) and become the
    latest one."""
    params = {"model_path": model_dir, "use_depth": True, "device": "cpu", "max_frame_age_s": 30.0}
    with active_node(ns + "_depth", params, "depth_client") as (c, proc):
        yield c, proc, segment_caller(c)


def test_depth_arriving_after_its_frame_is_paired_even_once_newer_depth_fills_the_buffer(fresh_depth_node) -> None:
    """Depth is paired when it arrives: a frame whose depth came late, followed by many newer depth images (as
    while the worker is busy with a slow job), still gets its own depth, not none and not a newer one."""
    client, node, segment = fresh_depth_node
    n = client.node
    # a frame whose largest object the bundled model segments from its box (stage 5 misses it in frame 5): this
    # test is about depth pairing, and needs a mask to place in 3D
    frame = render_frame(SEED, 4, 320, 240)
    pub_img = n.create_publisher(Image, "image", qos_profile_sensor_data)
    pub_depth = n.create_publisher(Image, "depth", qos_profile_sensor_data)
    pub_info = n.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
    # all three matched before the one camera_info is sent: a best-effort message sent earlier is simply lost
    publishers = (pub_img, pub_depth, pub_info)
    assert client.spin_until(lambda: all(p.get_subscription_count() for p in publishers), 10)
    img = image_msg(frame.rgb, 2000)
    info = CameraInfo(width=320, height=240, k=frame.K.reshape(-1).tolist())
    info.header = img.header
    # Best effort can lose a single message in transport (the frame once on a loaded CI machine; its camera_info
    # about 1 run in 12 here, just after matching), which is not what this test is about. The node keeps the
    # newest camera_info, so send it for a while first; then the frame (with its camera_info again) until the node
    # has it: an empty request answers at once, with "no frame has arrived" until then.
    for _ in range(5):
        pub_info.publish(info)
        client.spin_until(lambda: False, 0.1)
    for _ in range(20):
        pub_info.publish(info)
        pub_img.publish(img)
        client.spin_until(lambda: False, 0.3)
        probe = segment(Segment.Request())
        if "no frame has arrived" not in probe.message:
            break
    assert "nothing to segment" in probe.message, probe.message
    pub_depth.publish(numpy_to_image(frame.depth_m, "32FC1", img.header))  # the depth comes after its frame
    # let it reach the node before the flood: the subscription keeps the newest 5, so on a starved CPU the flood
    # could replace it in the middle-ware queue before any callback ran (a transport loss, not what is tested)
    client.spin_until(lambda: False, 0.5)
    for k in range(40):  # far more newer depth images than the node buffers, 2x farther away
        later = image_msg(frame.rgb, 3000 + k).header
        pub_depth.publish(numpy_to_image(2 * frame.depth_m, "32FC1", later))
        client.spin_until(lambda: False, 0.02)
    client.spin_until(lambda: False, 0.5)
    target = int(np.argmax([m.sum() for m in frame.masks]))
    ys, xs = np.nonzero(frame.masks[target])
    roi = RegionOfInterest(x_offset=int(xs.min()), y_offset=int(ys.min()), 
                         width=int(np.ptp(xs) + 1), height=int(np.ptp(ys) + 1))
    resp = segment(Segment.Request(boxes=[roi]))  # no image: the latest frame, the one with the late depth
    assert resp.success, resp.message
    assert resp.result.header.stamp.sec == 2000
    obj = resp.result.objects[0]
    pred = mono8_mask(obj.mask)
    assert pred.sum() >= BY_NAME["min_depth_points"].default, "the model gave no mask for a box on the largest object"
    assert obj.has_position, "the late depth image was not paired with its frame\n" + node.output[-2000:]
    expected = mask_centroid_3d(frame.depth_m, frame.K, pred, min_points=BY_NAME["min_depth_points"].default)
    assert np.allclose([obj.position.x, obj.position.y, obj.position.z], expected, atol=1e-3)


def test_click_topic_and_bad_topic_input_are_logged_not_fatal(client: Client, node: NodeProcess, segment) -> None:
    n = client.node
    pub_img = n.create_publisher(Image, "image", qos_profile_sensor_data)
    pub_click = n.create_publisher(PointStamped, "click", 10)
    pub_prompt = n.create_publisher(String, "prompt", 10)
    results: list[SegmentationResult] = []
    descriptions: list[String] = []
    n.create_subscription(SegmentationResult, "segmentation", results.append, 10)
    n.create_subscription(String, "description", descriptions.append, 10)
    assert client.spin_until(lambda: all(p.get_subscription_count() > 0 for p in (pub_img, pub_click, pub_prompt)), 20)
    # garbage on the image topic: wrong encoding, truncated data, empty image
    bad = [Image(height=8, width=8, encoding="nonsense", step=24, data=bytes(192)),
           Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(100)),
           Image(height=0, width=0, encoding="rgb8", step=0)]
    for b in bad:
        pub_img.publish(b)
        client.spin_until(lambda: False, 0.1)
    pub_prompt.publish(String(data="y" * 200))
    assert node.wait_for_log("prompt rejected", 10), node.output[-2000:]
    assert node.wait_for_log("dropped a frame", 10), node.output[-2000:]
    frame = render_frame(SEED, 5, 320, 240)
    target = int(np.argmax([m.sum() for m in frame.masks]))
    for _ in range(3):
        pub_img.publish(image_msg(frame.rgb, 77))
        client.spin_until(lambda: False, 0.1)
    outside = PointStamped()
    outside.point.x, outside.point.y = 5000.0, 10.0
    pub_click.publish(outside)
    assert node.wait_for_log("click rejected", 10), node.output[-2000:]
    x, y = shapesref.click_point(frame.masks[target], np.random.default_rng(1))
    click = PointStamped()
    click.point.x, click.point.y = float(x), float(y)
    pub_click.publish(click)
    assert client.spin_until(lambda: any(len(r.points) == 1 for r in results), 60), node.output[-2000:]
    res = next(r for r in results if len(r.points) == 1)
    assert res.header.stamp.sec == 77 and res.description
    assert client.spin_until(lambda: bool(descriptions), 5) and descriptions[-1].data == res.description
    assert node.proc.poll() is None, "the node died on bad input"
    assert segment(Segment.Request(image=image_msg(frame.rgb, 3), text="blue star")).success


def test_diagnostics_report_counts(client: Client, node: NodeProcess, segment) -> None:
    """Self-contained (xdist may run it on a worker of its own): one answer, one refused request, frames."""
    frame = render_frame(SEED, 3, 160, 120)
    for stamp in (1, 4):  # the same question twice: the second answer is drafted from the first
        assert segment(Segment.Request(image=image_msg(frame.rgb, stamp), text="red circle")).success
    assert not segment(Segment.Request(image=image_msg(frame.rgb, 2))).success  # nothing to segment
    pub_img = client.node.create_publisher(Image, "image", qos_profile_sensor_data)
    assert client.spin_until(lambda: pub_img.get_subscription_count() > 0, 10)
    for i in range(3):
        pub_img.publish(image_msg(frame.rgb, 10 + i))
        client.spin_until(lambda: False, 0.05)
    diagnostics = DiagnosticsReader(client)

    def counted() -> bool:
        v = diagnostics.latest()
        return bool(v) and int(v["results"]) >= 1 and int(v["errors"]) >= 1 and int(v["frames_received"]) >= 1

    assert client.spin_until(counted, 15), diagnostics.latest()
    values = diagnostics.latest()
    for key in ("device", "model", "results", "errors", "frames_received", "frames_dropped", "frames_rejected",
                "frames_lost_in_transport", "transport_loss_counted", "latency_ms_p50", "output_rate_hz",
                "queue_wait_ms_p50", "queue_wait_ms_p95", "transport_in_ms_p50", "callback_delay_ms_p95",
                "after_engine_ms_p50"):
        assert key in values, key
    # where a frame's time goes: rmw's timestamps on this machine's clock, so each stage is a real, small duration
    for stage in ("transport_in", "callback_delay"):  # the frames published above
        assert 0 <= float(values[f"{stage}_ms_p50"]) <= float(values[f"{stage}_ms_p95"]) < 5000, values
    assert float(values["transport_in_ms_p50"]) + float(values["callback_delay_ms_p50"]) > 0.01, values
    assert 0 < float(values["after_engine_ms_p50"]) < 5000, values  # the answers: result built and published
    assert values["device"].startswith("cpu")
    assert values["keep_freed_memory"] == "yes"  # the default on glibc: malloc's thresholds were fixed at load
    assert re.fullmatch(r"640x480 in \d+\.\d\d s", values["warmup"]), values["warmup"]  # the default warm-up
    # dtype auto on the CPU is float32; a CPU with fast bf16 products gets the hint at start, others do not
    hinted = "dtype:=bfloat16 answers faster" in node.output
    assert hinted == bool(fast_bf16_flags()), node.output[-2000:]
    assert values["transport_loss_counted"] == "yes"  # Fast DDS numbers its samples, so losses are seen
    accepted, drafted = a_of_b(values["draft_tokens_accepted"])
    assert 0 < accepted <= drafted
    assert 0 < float(values["decoder_passes_per_answer"]) < 10
    from_image, answers = a_of_b(values["answers_from_the_image_pass"])
    assert 2 <= from_image <= answers  # each request's first question was read with its image


def test_a_stale_latest_frame_is_refused_for_clicks_and_service_calls(client: Client, node: NodeProcess,
                                                                      segment) -> None:
    """A grasp must not act on where things were before the camera stopped: past max_frame_age_s the latest frame
    is refused with an error that says how old it is; a fresh frame is served again."""
    n = client.node
    set_parameter = parameter_setter(client)

    def set_max_age(seconds: float) -> None:
        set_parameter("max_frame_age_s", float(seconds))

    pub_img = n.create_publisher(Image, "image", qos_profile_sensor_data)
    pub_click = n.create_publisher(PointStamped, "click", 10)
    assert client.spin_until(lambda: pub_img.get_subscription_count() > 0 and pub_click.get_subscription_count() > 0, 20)
    frame = render_frame(SEED, 8, 160, 120)
    for _ in range(3):
        pub_img.publish(image_msg(frame.rgb, 88))
        client.spin_until(lambda: False, 0.1)
    set_max_age(0.5)
    try:
        client.spin_until(lambda: False, 1.5)  # no frame for 1.5 s: the camera "stopped"
        resp = segment(Segment.Request(text="red circle"))
        assert not resp.success
        assert "arrived" in resp.message and "max_frame_age_s=0.5" in resp.message, resp.message
        click = PointStamped()
        click.point.x, click.point.y = 10.0, 10.0
        pub_click.publish(click)
        assert node.wait_for_log("click ignored: the latest frame", 10), node.output[-2000:]
        set_max_age(30.0)  # the same frame, now young enough: served again
        resp = segment(Segment.Request(text="red circle"))
        assert resp.success and resp.result.header.stamp.sec == 88, resp.message
    finally:
        set_max_age(30.0)


def test_speculative_decoding_can_be_switched_off_at_run_time(client: Client, node: NodeProcess, segment) -> None:
    """speculative_decoding applies to the next request: off, answers are not drafted; on again, they are."""
    set_parameter = parameter_setter(client)
    diagnostics = DiagnosticsReader(client)
    frame = render_frame(SEED, 5, 160, 120)

    def drafted_tokens() -> int:
        return a_of_b(diagnostics.after(time.time())["draft_tokens_accepted"])[1]

    def ask(stamp: int) -> None:
        resp = segment(Segment.Request(image=image_msg(frame.rgb, stamp), text="green square"))
        assert resp.success, resp.message

    set_parameter("speculative_decoding", False)
    try:
        before = drafted_tokens()
        ask(51)
        ask(52)
        assert drafted_tokens() == before
    finally:
        set_parameter("speculative_decoding", True)
    ask(53)
    assert drafted_tokens() > before


def test_fuse_first_turn_can_be_switched_off_at_run_time(client: Client, node: NodeProcess, segment,
                                                        reference) -> None:
    """fuse_first_turn applies to the next request: off, the question is read in a pass of its own (the fused count
    stays while answers grow) and the answer is still the model's; on again, it is read with the image."""
    set_parameter = parameter_setter(client)
    diagnostics = DiagnosticsReader(client)
    frame = render_frame(SEED, 6, 160, 120)
    text = shapesref.expressions(frame.scene, np.random.default_rng(6))[0].text

    def fused_and_answers() -> tuple[int, int]:
        return a_of_b(diagnostics.after(time.time())["answers_from_the_image_pass"])

    def ask(stamp: int) -> None:
        resp = segment(Segment.Request(image=image_msg(frame.rgb, stamp), text=text))
        assert resp.success, resp.message
        assert_same_answer(resp.result, reference.segment(frame.rgb, text=text), frame.rgb.shape[:2])

    set_parameter("fuse_first_turn", False)
    try:
        fused, answers = fused_and_answers()
        ask(61)
        ask(62)
        fused_off, answers_off = fused_and_answers()
        assert fused_off == fused and answers_off == answers + 2, (fused, answers, fused_off, answers_off)
    finally:
        set_parameter("fuse_first_turn", True)
    ask(63)
    fused_on, answers_on = fused_and_answers()
    assert fused_on == fused_off + 1 and answers_on == answers_off + 1, (fused_off, answers_off, fused_on, answers_on)


@pytest.mark.slow
def test_a_node_with_compiled_image_passes_answers_like_the_model(ns: str, model_dir: str, reference) -> None:
    """compile_image:=true reaches the engine (its log lines), the warm-up compiles the camera's size before the
    node goes active, and the compiled node answers what the eager model in this process answers."""
    with active_node(ns + "_compiled", {"model_path": model_dir, "device": "cpu", "compile_image": True},
                     "compiled_client", ready_s=300.0) as (c, proc):
        assert proc.wait_for_log("compile_image: the first frame of each image size other than the warm-up's", 5)
        assert "warming up at 640x480: compiling" in proc.output and "warmed up: 640x480 in" in proc.output
        call = segment_caller(c)
        for index in (3, 4):  # the second frame reuses the first one's compiled passes (same size)
            frame = render_frame(SEED, index)
            text = shapesref.expressions(frame.scene, np.random.default_rng(index))[0].text
            resp = call(Segment.Request(image=image_msg(frame.rgb, 300 + index), text=text), timeout=240.0)
            assert resp.success, resp.message
            assert_same_answer(resp.result, reference.segment(frame.rgb, text=text), frame.rgb.shape[:2])


def test_every_parameter_is_declared_with_a_description(client: Client, node: NodeProcess) -> None:
    n = client.node
    lst = n.create_client(ListParameters, "pixel_sail/list_parameters")
    desc = n.create_client(DescribeParameters, "pixel_sail/describe_parameters")
    assert client.spin_until(lambda: lst.service_is_ready() and desc.service_is_ready(), 20)
    names = set(client.call(lst, ListParameters.Request()).result.names)
    assert set(BY_NAME) <= names, set(BY_NAME) - names
    described = client.call(desc, DescribeParameters.Request(names=sorted(BY_NAME))).descriptors
    assert all(len(d.description) > 15 for d in described)


def test_lifecycle_deactivate_frees_model_and_activate_restores(ns: str, model_dir: str) -> None:
    proc = NodeProcess(ns + "_lc", {"model_path": model_dir, "device": "cpu", "warmup_width": 320, "warmup_height": 240})
    c = Client(ns + "_lc", "lc_client")
    try:
        assert proc.wait_for_log("active: waiting for frames", 120), proc.output
        change = c.node.create_client(ChangeState, "pixel_sail/change_state")
        get = c.node.create_client(GetState, "pixel_sail/get_state")
        assert c.spin_until(lambda: change.service_is_ready() and get.service_is_ready(), 20)
        assert c.call(get, GetState.Request()).current_state.label == "active"
        req = ChangeState.Request()
        req.transition.id = 4  # deactivate
        assert c.call(change, req).success
        assert proc.wait_for_log("model released", 10)
        assert c.call(get, GetState.Request()).current_state.label == "inactive"
        req.transition.id = 3  # activate
        assert c.call(change, req).success
        seg = c.node.create_client(Segment, "segment")
        assert c.spin_until(seg.service_is_ready, 20)
        frame = render_frame(SEED, 2, 160, 120)
        assert c.call(seg, Segment.Request(image=image_msg(frame.rgb, 1), text="red square")).success
        assert proc.output.count("warmed up: 320x240 in") == 2  # the reloaded model warmed up again
    finally:
        c.close()
        took = proc.stop(sig=15)
    assert took < 2.0, f"SIGTERM took {took:.1f} s"
    assert proc.proc.returncode == 0, proc.output[-2000:]


def test_bad_model_path_fails_configure_clearly(ns: str, tmp_path) -> None:
    proc = NodeProcess(ns + "_bad", {"model_path": str(tmp_path / "nope"), "device": "cpu"})
    try:
        proc.proc.wait(timeout=60)
    finally:
        proc.stop()
    assert proc.proc.returncode != 0
    assert "configure failed" in proc.output and "nope" in proc.output, proc.output[-2000:]


def test_grasp_client_example_turns_a_spoken_line_into_a_target(client: Client, node: NodeProcess, ns: str, segment,
                                                                 quality_model: bool) -> None:
    import subprocess
    import sys
    from pathlib import Path

    frame = render_frame(SEED, 11, 320, 240)
    present, _ = present_expressions(frame, 1, np.random.default_rng(11))
    n = client.node
    pub_img = n.create_publisher(Image, "image", qos_profile_sensor_data)
    pub_depth = n.create_publisher(Image, "depth", qos_profile_sensor_data)
    pub_info = n.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
    # the client asks about the latest frame: the node must have one first (this test may be its first user)
    assert client.spin_until(lambda: min(p.get_subscription_count() for p in (pub_img, pub_depth, pub_info)) > 0, 20)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        pub_img.publish(image_msg(frame.rgb, 4000))
        client.spin_until(lambda: False, 0.1)
        if "no frame has arrived" not in segment(Segment.Request(text="red circle")).message:
            break
    script = Path(__file__).resolve().parents[2] / "examples" / "grasp_client.py"
    proc = subprocess.Popen([sys.executable, str(script), "--namespace", ns], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc.stdin.write(f"pick up {present[0].text}\nfind the x\n")
        proc.stdin.close()
        end = time.monotonic() + 90
        i = 0
        while proc.poll() is None and time.monotonic() < end:
            img = image_msg(frame.rgb, 5000 + i)
            info = CameraInfo(width=320, height=240, k=frame.K.reshape(-1).tolist())
            info.header = img.header
            pub_info.publish(info)
            pub_depth.publish(numpy_to_image(frame.depth_m, "32FC1", img.header))
            pub_img.publish(img)
            i += 1
            client.spin_until(lambda: False, 0.1)
        proc.wait(timeout=10)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    phrase = present[0].text
    assert f"target {phrase!r}" in out or f"{phrase!r}: not in view" in out, out
    if quality_model:
        assert "position (camera optical frame)" in out and "cloud" in out, out
