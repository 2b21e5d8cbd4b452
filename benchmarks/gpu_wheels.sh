#!/usr/bin/env bash
# Fetches, here (where pip reaches an index), the wheels that the GPU machine lacks for
# `benchmarks/gpu_h100.sh host`: grain and what it needs beyond that machine's image
# (array-record, portpicker), and ml-collections (qlhs_jax.data's configs). The image
# has the rest (Pillow, numpy, absl-py, etils, cloudpickle, protobuf, PyYAML, psutil;
# /work/.library/device/KINDS.md). Run from the repository root:
#   bash benchmarks/gpu_wheels.sh      # -> .whl/ (git ignores it), ~5 MB
# then carry ".whl" in the device call; gpu_h100.sh host installs them into /tmp/site.
# The versions are the ones the tests run with (pyproject.toml's pins allow them).
set -eu
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0
ls -l .whl
