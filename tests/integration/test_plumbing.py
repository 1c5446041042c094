"""The interfaces really work between processes over Fast DDS: a mask-carrying result and the service."""

from __future__ import annotations

import os

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
msgs = pytest.importorskip("pixel_sail_ros.msg", reason="interfaces not built: run `make build`")

from geometry_msgs.msg import Point  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from pixel_sail_ros.msg import SegmentationResult  # noqa: E402
from pixel_sail_ros.srv import Segment  # noqa: E402

from .plumbing_peer import pattern_mask  # noqa: E402
from .ros_helpers import ros_node, spin_until, start_process, stop_process  # noqa: E402

PEER = os.path.join(os.path.dirname(__file__), "plumbing_peer.py")


def test_segmentation_result_with_mask_arrives_intact(ros_namespace: str) -> None:
    peer = start_process([PEER, "publish", ros_namespace])
    try:
        with ros_node("listener", ros_namespace) as (node, executor):
            got: list[SegmentationResult] = []
            node.create_subscription(SegmentationResult, "segmentation", got.append, 10)
            assert spin_until(executor, lambda: bool(got), 20.0), "no SegmentationResult within 20 s"
    finally:
        log = stop_process(peer)
    res = got[0]
    assert res.header.frame_id == "camera_optical" and res.header.stamp.sec == 7 and res.header.stamp.nanosec == 123
    assert res.prompt == "the red mug" and res.description == "a small red mug"
    assert [(p.x, p.y) for p in res.points] == [(10.0, 20.0)]
    assert len(res.objects) == 1, log
    obj = res.objects[0]
    assert obj.mask.encoding == "mono8" and (obj.mask.height, obj.mask.width) == (48, 64)
    mask = np.frombuffer(bytes(obj.mask.data), np.uint8).reshape(48, 64)
    np.testing.assert_array_equal(mask == 255, pattern_mask(48, 64))
    assert set(np.unique(mask)) <= {0, 255}
    ys, xs = np.nonzero(mask)
    assert (obj.bbox.x_offset, obj.bbox.y_offset) == (xs.min(), ys.min())
    assert obj.has_position and obj.position.z == pytest.approx(0.9)
    assert obj.score == pytest.approx(0.75) and res.inference_seconds == pytest.approx(0.042)


def test_segment_service_round_trips(ros_namespace: str) -> None:
    peer = start_process([PEER, "serve", ros_namespace])
    try:
        with ros_node("caller", ros_namespace) as (node, executor):
            client = node.create_client(Segment, "segment")
            assert spin_until(executor, client.service_is_ready, 20.0), "service never appeared"

            def call(req: Segment.Request) -> Segment.Response:
                fut = client.call_async(req)
                assert spin_until(executor, fut.done, 20.0), "no response within 20 s"
                return fut.result()

            req = Segment.Request(text="the blue star", points=[Point(x=3.0, y=4.0, z=0.0)], describe=True)
            req.image = Image(height=30, width=40, encoding="rgb8", step=120)
            req.image.data = bytes(30 * 120)
            req.image.header.frame_id = "cam"
            req.image.header.stamp.sec = 99
            good = call(req)
            bad = call(Segment.Request(text="no image"))
    finally:
        stop_process(peer)
    assert good.success and good.result.prompt == "the blue star"
    assert good.result.header.frame_id == "cam" and good.result.header.stamp.sec == 99
    assert [(p.x, p.y) for p in good.result.points] == [(3.0, 4.0)]
    mask = np.frombuffer(bytes(good.result.objects[0].mask.data), np.uint8).reshape(30, 40)
    np.testing.assert_array_equal(mask == 255, pattern_mask(30, 40))
    assert not bad.success and "image" in bad.message
