"""Start the pixel_sail node (and optionally RViz).

    ros2 launch pixel_sail_ros pixel_sail.launch.py image:=/camera/color/image_raw use_depth:=true \
        depth:=/camera/aligned_depth_to_color/image_raw camera_info:=/camera/color/camera_info
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("pixel_sail_ros")
    arg = LaunchConfiguration
    profile = os.path.join(share, "config", "fastdds_large_frames.xml")
    args = [
        DeclareLaunchArgument("fastdds_profile",
                              default_value=EnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", default_value=profile),
                              description="Fast DDS profile; the default gives camera-sized messages shared memory"),
        DeclareLaunchArgument("namespace", default_value="pixel_sail", description="Namespace of the node and its topics"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "pixel_sail.yaml"),
                              description="Parameter YAML; the arguments below override it"),
        DeclareLaunchArgument("model_path", default_value="", description="Checkpoint directory; empty = bundled model"),
        DeclareLaunchArgument("device", default_value="auto", description="auto | cpu | cuda | cuda:N"),
        DeclareLaunchArgument("dtype", default_value="auto",
                              description="auto | float32 | bfloat16 | float16 (bfloat16: faster on a CPU with AMX "
                                          "or AVX512-BF16)"),
        DeclareLaunchArgument("image_qos", default_value="sensor_data", choices=["sensor_data", "reliable"],
                              description="QoS of the camera subscription; must match the driver"),
        DeclareLaunchArgument("use_depth", default_value="false", choices=["true", "false"],
                              description="Subscribe to depth + camera_info and publish 3D outputs"),
        DeclareLaunchArgument("target_frame", default_value="",
                              description="Frame for markers and object_cloud, from TF at the image's stamp "
                                          "(e.g. base_link); empty = the camera's optical frame"),
        DeclareLaunchArgument("use_compressed", default_value="false", choices=["true", "false"],
                              description="Subscribe to <image>/compressed instead of <image>"),
        DeclareLaunchArgument("image", default_value="/camera/color/image_raw", description="Colour image topic"),
        DeclareLaunchArgument("depth", default_value="/camera/aligned_depth_to_color/image_raw",
                              description="Depth topic, registered to the colour image"),
        DeclareLaunchArgument("camera_info", default_value="/camera/color/camera_info", description="CameraInfo topic"),
        DeclareLaunchArgument("rviz", default_value="false", choices=["true", "false"], description="Also start RViz"),
    ]
    node = Node(
        package="pixel_sail_ros",
        executable="pixel_sail_node",
        name="pixel_sail",
        namespace=arg("namespace"),
        output="screen",
        parameters=[
            arg("params_file"),
            {
                "model_path": arg("model_path"),
                "device": arg("device"),
                "dtype": arg("dtype"),
                "image_qos": arg("image_qos"),
                "use_depth": ParameterValue(arg("use_depth"), value_type=bool),
                "use_compressed": ParameterValue(arg("use_compressed"), value_type=bool),
                "target_frame": ParameterValue(arg("target_frame"), value_type=str),
            },
        ],
        remappings=[
            ("image", arg("image")),
            ("image/compressed", [arg("image"), "/compressed"]),
            ("depth", arg("depth")),
            ("camera_info", arg("camera_info")),
        ],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", os.path.join(share, "config", "pixel_sail.rviz")],
        condition=IfCondition(arg("rviz")),
    )
    fastdds = SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", arg("fastdds_profile"))
    return LaunchDescription(args + [fastdds, node, rviz])
