"""The ROS 2 layer: the only part of pixel_sail_ros that imports rclpy or ROS message packages."""
