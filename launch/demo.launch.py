"""The demo without a camera: a synthetic ShapesRef camera feeding the node on the bundled model, with RViz.

    ros2 launch pixel_sail_ros demo.launch.py
    ros2 topic pub --once /pixel_sail/prompt std_msgs/String "data: 'red circle'"
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("pixel_sail_ros")
    arg = LaunchConfiguration
    profile = os.path.join(share, "config", "fastdds_large_frames.xml")
    args = [
        DeclareLaunchArgument("fastdds_profile",
                              default_value=EnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", default_value=profile),
                              description="Fast DDS profile; the default gives camera-sized messages shared memory"),
        DeclareLaunchArgument("namespace", default_value="pixel_sail", description="Namespace of both nodes"),
        DeclareLaunchArgument("rate_hz", default_value="5.0", description="Synthetic camera frame rate"),
        DeclareLaunchArgument("rviz", default_value="true", choices=["true", "false"], description="Also start RViz"),
    ]
    camera = Node(
        package="pixel_sail_ros",
        executable="synthetic_camera_node",
        name="synthetic_camera",
        namespace=arg("namespace"),
        parameters=[{"rate_hz": arg("rate_hz"), "publish_depth": True, "frame_id": "camera_optical"}],
    )
    node = Node(
        package="pixel_sail_ros",
        executable="pixel_sail_node",
        name="pixel_sail",
        namespace=arg("namespace"),
        output="screen",
        parameters=[os.path.join(share, "config", "pixel_sail.yaml"), {"use_depth": True}],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", os.path.join(share, "config", "pixel_sail.rviz")],
        condition=IfCondition(arg("rviz")),
    )
    fastdds = SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", arg("fastdds_profile"))
    return LaunchDescription(args + [fastdds, camera, node, rviz])
