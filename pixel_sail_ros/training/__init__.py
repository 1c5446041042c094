"""Training and evaluation: ShapesRef, manifests, losses, metrics, CLIs. No ROS."""
