# pixel_sail_ros — everything from two commands: `make demo` and `make test`.
# `make setup` creates .venv (pinned ROS 2 Kilted wheels + torch/transformers) and builds the
# interfaces into install/. Every target is idempotent and quick when nothing changed.

SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
PYTHON ?= $(shell for p in python3.11 python3.12 python3.10 python3; do command -v $$p >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := $(ROOT)/.venv
VPY := $(VENV)/bin/python
BUILD := $(ROOT)/build/pixel_sail_ros
STAGE := $(ROOT)/build/src/pixel_sail_ros
STAGED := CMakeLists.txt cmake package.xml msg srv scripts launch config pixel_sail_ros
INSTALL := $(ROOT)/install
PYTEST_ARGS ?= -n 2 --timeout 600
ENV := source $(ROOT)/env.sh &&

.PHONY: all setup build test demo bench clean distclean help device-wheels
all: setup

help:
	@echo "make setup   - create .venv and build the ROS interfaces (idempotent)"
	@echo "make test    - setup if needed, then run the whole test suite"
	@echo "make demo    - setup if needed, then run the node on the bundled model with a synthetic camera"
	@echo "make bench   - pixel-sail-bench --suite all --json"

$(VENV)/.stamp: requirements/ros.txt requirements/ml.txt requirements/test.txt setup.py
	@test -n "$(PYTHON)" || { echo "no python3.10-3.12 found"; exit 1; }
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -U "pip>=24"
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements/ros.txt -r requirements/ml.txt -r requirements/test.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

setup: $(VENV)/.stamp build

IFACES := $(wildcard msg/*.msg srv/*.srv) CMakeLists.txt $(wildcard cmake/*) package.xml $(wildcard scripts/*) $(wildcard launch/*) $(wildcard config/*)
PYSRC := $(shell find pixel_sail_ros -type f -not -name '*.pyc' -not -path '*/__pycache__/*' 2>/dev/null)

# One ament_cmake package, configured from $(1), built in $(2) and installed into install/.
define cmake_package
	export VIRTUAL_ENV=$(VENV) PATH=$(VENV)/bin:$$PATH AMENT_PREFIX_PATH=$(INSTALL):$(VENV) CMAKE_PREFIX_PATH=$(INSTALL):$(VENV) && \
	cmake -S $(1) -B $(2) -DCMAKE_INSTALL_PREFIX=$(INSTALL) -DPython3_EXECUTABLE=$(VPY) \
	  -DPIXEL_SAIL_FIX_PY_INCLUDES=ON -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >$(2).log 2>&1 || { cat $(2).log; exit 1; } && \
	cmake --build $(2) -j2 >>$(2).log 2>&1 || { tail -50 $(2).log; exit 1; } && \
	cmake --install $(2) >>$(2).log 2>&1 || { tail -50 $(2).log; exit 1; }
endef

# tf2_msgs (TFMessage, for the node's target_frame): the registry wheels lack it; see ros_deps/README.md.
TF2_MSGS := $(wildcard ros_deps/tf2_msgs/msg/*.msg) ros_deps/tf2_msgs/CMakeLists.txt ros_deps/tf2_msgs/package.xml $(wildcard cmake/*)
$(INSTALL)/.tf2_msgs.stamp: $(VENV)/.stamp $(TF2_MSGS)
	mkdir -p $(ROOT)/build
	$(call cmake_package,$(ROOT)/ros_deps/tf2_msgs,$(ROOT)/build/tf2_msgs)
	@touch $@

$(INSTALL)/.stamp: $(VENV)/.stamp $(INSTALL)/.tf2_msgs.stamp $(IFACES) $(PYSRC)
	@# CMake refuses exported include paths inside the source dir, and .venv (with numpy's headers) is
	@# inside this checkout: configure from a staging dir of symlinks instead of the checkout itself.
	rm -rf $(STAGE) && mkdir -p $(STAGE) && for f in $(STAGED); do ln -s $(ROOT)/$$f $(STAGE)/$$f; done
	$(call cmake_package,$(STAGE),$(BUILD))
	@touch $@

build: $(INSTALL)/.stamp

test: setup
	$(ENV) python -m pytest $(PYTEST_ARGS)

demo: setup
	$(ENV) python -m pixel_sail_ros.ros.demo

bench: setup
	$(ENV) pixel-sail-bench --suite all --json

clean:
	rm -rf build install log .pytest_cache

distclean: clean
	rm -rf .venv

# Pinned packages that a GPU machine without network lacks, as wheels for scripts/device_check.sh (.whl/ is
# ignored by git: name it in the device tool's carry).
device-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl transformers==5.23.0 tokenizers==0.23.3
