"""target_frame: the node's markers and object_cloud moved into another frame with TF at the image's stamp.

The node runs in its own process with `target_frame: base_link`; this test process is the TF tree (a moving
base_link -> camera_link on /tf, the REP 103 optical rotation on /tf_static), as a robot's state publisher is.
"""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("pixel_sail_ros.msg", reason="interfaces not built: run `make build`")
tf2_msgs = pytest.importorskip("tf2_msgs.msg", reason="tf2_msgs not built: run `make build`")

from geometry_msgs.msg import TransformStamped  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, RegionOfInterest  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from pixel_sail_ros.ros.image_conversion import numpy_to_image  # noqa: E402
from pixel_sail_ros.ros.parameters import BY_NAME  # noqa: E402
from pixel_sail_ros.ros.point_cloud import deproject, mask_centroid_3d, read_points  # noqa: E402
from pixel_sail_ros.srv import Segment  # noqa: E402
from pixel_sail_ros.training.camera_frames import render_frame  # noqa: E402

from .node_harness import Client, active_node, image_msg, mono8_mask, outputs_3d_for, segment_caller  # noqa: E402

SEED = 424242
pytestmark = pytest.mark.timeout(300)
TF_TIMEOUT_S = 2.0
# optical (x right, y down, z forward) -> camera_link (x forward, y left, z up), REP 103
OPTICAL_TO_LINK = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def z_turn(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def transform(parent: str, child: str, sec: int, xyz, yaw_deg: float = 0.0, xyzw=None) -> TransformStamped:
    t = TransformStamped()
    t.header.stamp.sec, t.header.frame_id, t.child_frame_id = sec, parent, child
    t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = (float(v) for v in xyz)
    q = xyzw if xyzw is not None else (0.0, 0.0, math.sin(math.radians(yaw_deg) / 2), math.cos(math.radians(yaw_deg) / 2))
    r = t.transform.rotation
    r.x, r.y, r.z, r.w = (float(v) for v in q)
    return t


@pytest.fixture(scope="module")
def tf_node(model_dir: str):
    ns = "/tf" + uuid.uuid4().hex[:10]
    params = {"model_path": model_dir, "use_depth": True, "device": "cpu", "target_frame": "base_link",
              "tf_timeout_s": TF_TIMEOUT_S}
    with active_node(ns, params, "tf_client") as (client, proc):
        yield client, proc, segment_caller(client)


@pytest.fixture(scope="module")
def scene(tf_node):
    """Publishers (camera_info sent once), collected markers and clouds, and a frame with its largest object's box."""
    client, node, _ = tf_node
    n = client.node
    pubs = {
        "depth": n.create_publisher(Image, "depth", qos_profile_sensor_data),
        "info": n.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data),
        "tf": n.create_publisher(tf2_msgs.TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)),
        "tf_static": n.create_publisher(tf2_msgs.TFMessage, "/tf_static", QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)),
    }
    assert client.spin_until(lambda: all(p.get_subscription_count() for p in pubs.values()), 20)
    frame = render_frame(SEED, 4, 320, 240)
    info = CameraInfo(width=320, height=240, k=frame.K.reshape(-1).tolist())
    info.header.frame_id = "camera_optical"
    pubs["info"].publish(info)
    target = int(np.argmax([m.sum() for m in frame.masks]))
    ys, xs = np.nonzero(frame.masks[target])
    roi = RegionOfInterest(x_offset=int(xs.min()), y_offset=int(ys.min()), width=int(np.ptp(xs) + 1),
                           height=int(np.ptp(ys) + 1))
    pubs["tf_static"].publish(tf2_msgs.TFMessage(transforms=[
        transform("camera_link", "camera_optical", 0, (0, 0, 0), xyzw=(-0.5, 0.5, -0.5, 0.5))]))
    # the camera's mount moves: at the stamp 2000 it is halfway between the transforms at 1999 and 2001; the
    # newest one (2005) is far off, so a lookup of the latest transform would put the object elsewhere
    pubs["tf"].publish(tf2_msgs.TFMessage(transforms=[
        transform("base_link", "camera_link", 1999, (0.0, 0.0, 0.5), 0.0),
        transform("base_link", "camera_link", 2001, (0.2, 0.0, 0.5), 30.0),
        transform("base_link", "camera_link", 2005, (3.0, 1.0, 0.5), 90.0)]))
    got: dict[str, list] = {"markers": [], "cloud": []}
    n.create_subscription(MarkerArray, "markers", got["markers"].append, 10)
    n.create_subscription(PointCloud2, "object_cloud", got["cloud"].append, 10)
    client.spin_until(lambda: False, 0.3)
    return pubs, frame, roi, got


def request(pubs: dict, client: Client, frame, roi, sec: int, frame_id: str = "camera_optical") -> Segment.Request:
    """A segment request for the frame at ``sec`` (its box prompt), its depth published just before."""
    img = image_msg(frame.rgb, sec, frame_id)
    pubs["depth"].publish(numpy_to_image(frame.depth_m, "32FC1", img.header))
    client.spin_until(lambda: False, 0.3)
    return Segment.Request(image=img, boxes=[roi])


def test_markers_and_cloud_use_the_transform_at_the_image_stamp_not_the_latest(tf_node, scene) -> None:
    client, node, segment = tf_node
    pubs, frame, roi, got = scene
    resp = segment(request(pubs, client, frame, roi, 2000))
    assert resp.success, resp.message
    obj = resp.result.objects[0]
    pred = mono8_mask(obj.mask)
    assert obj.has_position, "no 3D position: the depth was not paired\n" + node.output[-2000:]
    in_camera = mask_centroid_3d(frame.depth_m, frame.K, pred, min_points=BY_NAME["min_depth_points"].default)
    # SegmentedObject.position stays in the image's optical frame (the message contract)
    assert np.allclose([obj.position.x, obj.position.y, obj.position.z], in_camera, atol=1e-3)
    rotation, offset = z_turn(15.0) @ OPTICAL_TO_LINK, np.array([0.1, 0.0, 0.5])
    markers, cloud_msg = outputs_3d_for(client, got["markers"], got["cloud"], 2000, 10)
    assert {m.header.frame_id for m in markers.markers} == {"base_link"}, node.output[-2000:]
    sphere = markers.markers[1]
    np.testing.assert_allclose([sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z],
                               rotation @ in_camera + offset, atol=1e-3)
    label = markers.markers[2]
    assert label.pose.position.z > sphere.pose.position.z  # camera-up is +z in base_link here
    assert cloud_msg.header.frame_id == "base_link" and cloud_msg.header.stamp.sec == 2000
    expected_cloud = deproject(frame.depth_m, frame.K, pred) @ rotation.T + offset
    np.testing.assert_allclose(read_points(cloud_msg), expected_cloud, atol=1e-4)


def test_a_transform_that_arrives_within_tf_timeout_is_waited_for(tf_node, scene) -> None:
    client, node, segment = tf_node
    pubs, frame, roi, got = scene
    cli = client.node.create_client(Segment, "segment")
    future = cli.call_async(request(pubs, client, frame, roi, 2008))  # /tf has reached only 2005 so far
    client.spin_until(future.done, 0.5)
    assert not future.done(), "the node answered before the transform for its stamp could arrive"
    pubs["tf"].publish(tf2_msgs.TFMessage(transforms=[transform("base_link", "camera_link", 2009, (1.0, 2.0, 0.5))]))
    assert client.spin_until(future.done, 60), "no answer"
    assert future.result().success
    markers, cloud_msg = outputs_3d_for(client, got["markers"], got["cloud"], 2008, 10)
    assert markers.markers[0].header.frame_id == "base_link" and len(markers.markers) == 3
    assert cloud_msg.width > 0, "the waited-for transform was not used\n" + node.output[-2000:]


@pytest.mark.parametrize("sec, frame_id, reason", [
    (2100, "camera_optical", "would extrapolate into the future"),
    (2101, "wrist_camera", "frame 'wrist_camera' does not exist"),
])
def test_without_a_transform_3d_is_cleared_and_the_error_is_said(tf_node, scene, sec: int, frame_id: str,
                                                                 reason: str) -> None:
    client, node, segment = tf_node
    pubs, frame, roi, got = scene
    resp = segment(request(pubs, client, frame, roi, sec, frame_id))
    assert resp.success, resp.message  # the 2D result and the optical-frame position still come back
    assert resp.result.objects and resp.result.objects[0].has_position
    markers, cloud_msg = outputs_3d_for(client, got["markers"], got["cloud"], sec, 10)
    assert [m.action for m in markers.markers] == [3] and markers.markers[0].header.frame_id == "base_link"
    assert cloud_msg.width == 0 and cloud_msg.header.frame_id == "base_link"
    assert node.wait_for_log(f"no transform from '{frame_id}'", 5), node.output[-2000:]
    assert any(reason in line for line in node.lines), node.output[-2000:]
