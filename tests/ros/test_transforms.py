"""The node's TF buffer against hand-computed geometry: chains, interpolation at a stamp, and its errors."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pixel_sail_ros.ros.transforms import RigidTransform, TransformBuffer, TransformError, quaternion_matrix, slerp


def z_rotation(deg: float) -> list[float]:
    half = math.radians(deg) / 2
    return [0.0, 0.0, math.sin(half), math.cos(half)]


quaternions = st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4).filter(
    lambda q: np.linalg.norm(q) > 0.1)
translations = st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3)


def test_quaternion_matrix_of_a_quarter_turn_about_z_takes_x_to_y() -> None:
    np.testing.assert_allclose(quaternion_matrix(z_rotation(90)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(quaternion_matrix([0, 0, 0, 2.0]), np.eye(3))  # normalised first


@settings(max_examples=50, deadline=None)
@given(quaternions)
def test_quaternion_matrix_is_a_rotation(q) -> None:
    r = quaternion_matrix(q)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(quaternions, translations, quaternions, translations)
def test_compose_and_inverse_agree_with_applying_in_turn(q1, t1, q2, t2) -> None:
    a, b = RigidTransform.from_quaternion(t1, q1), RigidTransform.from_quaternion(t2, q2)
    points = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]])
    np.testing.assert_allclose((a @ b).apply(points), a.apply(b.apply(points)), atol=1e-9)
    np.testing.assert_allclose(a.inverse().apply(a.apply(points)), points, atol=1e-9)


def test_apply_keeps_float32_clouds_float32() -> None:
    out = RigidTransform.from_quaternion([1, 2, 3], [0, 0, 0, 1]).apply(np.zeros((5, 3), np.float32))
    assert out.dtype == np.float32 and out.shape == (5, 3)
    np.testing.assert_allclose(out[0], [1, 2, 3])


def test_slerp_halfway_between_0_and_90_degrees_is_45() -> None:
    q = slerp(np.array(z_rotation(0)), np.array(z_rotation(90)), 0.5)
    np.testing.assert_allclose(q, z_rotation(45), atol=1e-12)
    # q and -q are one rotation: the short way round, not through 180 degrees
    q = slerp(np.array(z_rotation(10)), -np.array(z_rotation(30)), 0.5)
    np.testing.assert_allclose(quaternion_matrix(q), quaternion_matrix(z_rotation(20)), atol=1e-12)


@pytest.fixture
def arm() -> TransformBuffer:
    """world -> base_link (moving, t = 1 and 2) -> camera_link (static) -> camera_optical (static); base -> tool."""
    tf = TransformBuffer()
    tf.add("world", "base_link", 1.0, [0, 0, 0], z_rotation(0))
    tf.add("world", "base_link", 2.0, [1, 0, 0], z_rotation(90))
    tf.add("base_link", "camera_link", 0.0, [0.5, 0, 1.0], z_rotation(0), static=True)
    tf.add("camera_link", "camera_optical", 0.0, [0, 0, 0], [-0.5, 0.5, -0.5, 0.5], static=True)  # REP 103 optical
    tf.add("base_link", "tool", 1.5, [0, 0.2, 0.3], z_rotation(0))
    return tf


def test_an_optical_frame_point_lands_where_rep_103_says(arm: TransformBuffer) -> None:
    # optical z (forward) is camera_link x; optical x (right) is camera_link -y; optical y (down) is -z
    t = arm.lookup("camera_link", "camera_optical", 5.0)
    np.testing.assert_allclose(t.apply(np.array([[0, 0, 2.0], [1.0, 0, 0], [0, 1.0, 0]])),
                               [[2.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]], atol=1e-12)


def test_chain_is_composed_link_by_link_at_the_stamp(arm: TransformBuffer) -> None:
    p_optical = np.array([0.0, 0.0, 2.0])  # 2 m in front of the camera
    at_1 = arm.lookup("world", "camera_optical", 1.0).apply(p_optical)
    np.testing.assert_allclose(at_1, [0.5 + 2.0, 0, 1.0], atol=1e-12)
    at_2 = arm.lookup("world", "camera_optical", 2.0).apply(p_optical)  # base turned 90 deg and moved 1 m along x
    np.testing.assert_allclose(at_2, [1.0, 2.5, 1.0], atol=1e-12)
    back = arm.lookup("camera_optical", "world", 2.0).apply(at_2)
    np.testing.assert_allclose(back, p_optical, atol=1e-12)


def test_stamp_between_two_transforms_interpolates_translation_and_rotation(arm: TransformBuffer) -> None:
    t = arm.lookup("world", "base_link", 1.5)
    np.testing.assert_allclose(t.translation, [0.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(t.rotation, quaternion_matrix(z_rotation(45)), atol=1e-12)
    np.testing.assert_allclose(arm.lookup("world", "base_link", 0.0).translation, [1, 0, 0])  # 0 = newest


def test_stamp_zero_is_the_latest_time_all_links_on_the_path_share(arm: TransformBuffer) -> None:
    """world -> base_link reaches 2.0 but base_link -> tool only 1.5: "latest" is 1.5 for the whole chain."""
    latest = arm.lookup("world", "tool", 0.0)
    at_common = arm.lookup("world", "tool", 1.5)
    np.testing.assert_allclose(latest.rotation, at_common.rotation, atol=1e-12)
    np.testing.assert_allclose(latest.translation, at_common.translation, atol=1e-12)
    each_newest = arm.lookup("world", "base_link", 2.0) @ arm.lookup("base_link", "tool", 1.5)
    assert not np.allclose(latest.translation, each_newest.translation)  # never links from different moments


def test_siblings_meet_at_their_common_parent_without_touching_links_above(arm: TransformBuffer) -> None:
    # world -> base_link holds only 1..2 s, but tool -> camera never passes through it
    t = arm.lookup("tool", "camera_link", 1.5)
    np.testing.assert_allclose(t.apply(np.zeros(3)), [0.5, -0.2, 0.7], atol=1e-12)


@pytest.mark.parametrize("stamp, word", [(2.5, "future"), (0.5, "past")])
def test_no_extrapolation_and_the_error_says_which_link_and_when(arm: TransformBuffer, stamp: float, word: str) -> None:
    with pytest.raises(TransformError, match=rf"'world' -> 'base_link' at {stamp:.6f} would extrapolate into the {word}"):
        arm.lookup("world", "camera_optical", stamp)


def test_unknown_and_disconnected_frames_are_named(arm: TransformBuffer) -> None:
    with pytest.raises(TransformError, match=r"frame 'base' does not exist.*known frames: base_link, camera_link"):
        arm.lookup("base", "camera_optical", 1.0)
    with pytest.raises(TransformError, match=r"nothing on /tf or /tf_static yet"):
        TransformBuffer().lookup("base_link", "camera", 1.0)
    arm.add("map", "odom", 1.0, [0, 0, 0], [0, 0, 0, 1])
    with pytest.raises(TransformError, match=r"different TF trees \(roots 'map' and 'world'\)"):
        arm.lookup("odom", "camera_optical", 1.5)
    assert np.allclose(arm.lookup("nowhere", "nowhere", 1.0).apply(np.ones(3)), 1.0)  # same frame: identity


def test_old_transforms_leave_the_cache_and_a_reparented_frame_starts_over() -> None:
    tf = TransformBuffer(cache_s=1.0)
    for s in (0.5, 1.0, 1.5, 2.0):
        tf.add("odom", "base", s, [s, 0, 0], [0, 0, 0, 1])
    with pytest.raises(TransformError, match="into the past"):
        tf.lookup("odom", "base", 0.75)
    assert tf.lookup("odom", "base", 1.25).translation[0] == pytest.approx(1.25)
    tf.add("map", "base", 3.0, [7, 0, 0], [0, 0, 0, 1])
    assert tf.lookup("map", "base", 3.0).translation[0] == 7
    with pytest.raises(TransformError, match="does not exist|different TF trees"):
        tf.lookup("odom", "base", 1.25)


def test_a_cycle_is_reported_not_followed() -> None:
    tf = TransformBuffer()
    tf.add("a", "b", 0.0, [0, 0, 0], [0, 0, 0, 1], static=True)
    tf.add("b", "a", 0.0, [0, 0, 0], [0, 0, 0, 1], static=True)
    tf.add("a", "c", 0.0, [0, 0, 0], [0, 0, 0, 1], static=True)
    with pytest.raises(TransformError, match="cycle"):
        tf.lookup("c", "b", 1.0)


@pytest.mark.parametrize("args, match", [
    (("a", "b", 0.0, [0, 0, float("nan")], [0, 0, 0, 1]), "3 finite values"),
    (("a", "b", 0.0, [0, 0, 0], [0, 0, 0, 0]), "length 0"),
    (("a", "b", 0.0, [0, 0, 0], [0, 0, 1]), "4 finite quaternion values"),
    (("a", "a", 0.0, [0, 0, 0], [0, 0, 0, 1]), "its own parent"),
    (("", "b", 0.0, [0, 0, 0], [0, 0, 0, 1]), "a parent and a child"),
])
def test_malformed_transforms_are_refused(args, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TransformBuffer().add(*args)


def test_wait_for_returns_once_the_transform_arrives_and_times_out_otherwise() -> None:
    tf = TransformBuffer()
    tf.add("base", "camera", 1.0, [0, 0, 0], [0, 0, 0, 1])
    later = threading.Timer(0.1, lambda: tf.add("base", "camera", 3.0, [2, 0, 0], [0, 0, 0, 1]))
    later.start()
    start = time.monotonic()
    t = tf.wait_for("base", "camera", 2.0, timeout_s=5.0)
    assert t.translation[0] == pytest.approx(1.0)
    assert time.monotonic() - start < 4.0
    later.join()
    start = time.monotonic()
    with pytest.raises(TransformError, match="into the future"):
        tf.wait_for("base", "camera", 9.0, timeout_s=0.2)
    assert 0.15 < time.monotonic() - start < 3.0


def test_the_tfmessage_built_here_is_wire_compatible_with_ros_tf() -> None:
    """make setup builds tf2_msgs (ros_deps/) for the wheels; its type hash must be upstream's (Jazzy..Lyrical)."""
    import json
    from pathlib import Path

    from ament_index_python.packages import get_package_share_directory

    description = json.loads((Path(get_package_share_directory("tf2_msgs")) / "msg" / "TFMessage.json").read_text())
    hashes = {h["type_name"]: h["hash_string"] for h in description["type_hashes"]}
    assert hashes["tf2_msgs/msg/TFMessage"] == "RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087"
