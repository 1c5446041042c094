"""Plain-pip install of pixel_sail_ros: the model, training and CLIs without ROS.

The ROS node and the generated messages come from the ament_cmake build (CMakeLists.txt); this file
gives users without ROS `pip install .` → PixelSailEngine, pixel-sail-train/-eval/-convert/-bench.
"""

from setuptools import find_packages, setup

setup(
    name="pixel_sail_ros",
    version="0.1.0",
    description="Pixel-SAIL single-transformer pixel-grounded segmentation and description, with a ROS 2 node",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pixel_sail_ros", "pixel_sail_ros.*"]),
    package_data={"pixel_sail_ros": ["checkpoints/*/*.json", "checkpoints/*/*.safetensors", "checkpoints/*/*.md"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23,<5.24",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "numpy>=1.26",
        "opencv-python-headless<5",
        "pycocotools>=2.0.8",
        "tqdm",
        "matplotlib",
        "psutil",
    ],
    extras_require={"lora": ["peft>=0.17"], "test": ["pytest", "pytest-xdist", "pytest-timeout", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "pixel-sail-train=pixel_sail_ros.training.train:main",
            "pixel-sail-eval=pixel_sail_ros.training.evaluate:main",
            "pixel-sail-convert=pixel_sail_ros.model.convert:main",
            "pixel-sail-bench=pixel_sail_ros.bench:main",
        ]
    },
)
