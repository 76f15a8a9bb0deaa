#!/usr/bin/env bash
# The Python packages ip2p_jax needs that the lent GPU machine lacks (its image has jax,
# torch, transformers, numpy, ...; see the device README's package list), as cp312 wheels
# in the ignored .whl/, which a lease call carries and installs with --target.
# Versions are this venv's (flax/optax/orbax pinned to ours); run it from an activated venv.
#
#   ./scripts/gpu_wheels.sh   # then: run(carry=[".whl"], ...), see scripts/gpu_default_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
# grain needs portpicker and importlib_metadata needs lazy-importer: neither is there.
PACKAGES="diffusers grain array_record tensorflow-datasets ml_collections tensorboardX dm-tree
  immutabledict simple-parsing termcolor toml tensorflow-metadata docstring_parser
  importlib_resources importlib_metadata lazy-importer portpicker googleapis-common-protos
  flax optax orbax-checkpoint"
version() { python -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }
PLATFORMS=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
for name in $PACKAGES; do
  v=$(version "$name"); [ -n "$v" ] || { echo "$name is not installed here" >&2; exit 1; }
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $PLATFORMS --platform any -d .whl "$name==$v"
done
# promise (tensorflow-datasets) has no wheel on the index: build one
python -m pip wheel -q --no-deps -w .whl "promise==$(version promise)"
du -sh .whl
