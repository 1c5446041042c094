"""The ROS suites of pixel-sail-bench (node latency against an rclpy echo, soak); the CLI is pixel_sail_ros.bench."""
