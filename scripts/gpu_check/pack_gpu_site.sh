#!/usr/bin/env bash
# Pack, into .whl/site-py312.tar.xz, the Python packages scripts/gpu_check/gpu_check.sh needs on the lent GPU
# machine, which has no package registry.
#
# Its Python 3.12 image already holds torch, numpy, scipy, scikit-image, matplotlib, pandas, timm,
# pytest, ... (/work/.library/device/KINDS.md); these are the packages of our dependency closure it
# lacks, at the versions this project is tested with. acvl-utils has no wheel on the registry and is
# built from its pure-Python sdist. The wheels (~67 MB, SimpleITK alone 53 MB) are over what may
# travel to that machine (64 MiB), so they are installed into a folder here with a Python 3.12 and
# that folder is xz-compressed (~38 MB). Run from the repository root; .whl/ is git-ignored.
#   PYTHON312=/path/to/python3.12 bash scripts/gpu_check/pack_gpu_site.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON312=${PYTHON312:-python3.12}
PACKAGES=(
    nnunetv2==2.8.1 segment-anything==1.0 dynamic-network-architectures==0.4.4
    batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 SimpleITK==2.5.7 nibabel==5.4.2
    blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2 connected-components-3d==4.1.1
    yacs==0.1.8 graphviz==0.21 future==1.0.0 unittest2==1.1.0 linecache2==1.0.0 traceback2==1.4.0
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for platform in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${platform}_x86_64")
done
"$PYTHON312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$work/wheels" "${PACKAGES[@]}"
"$PYTHON312" -m pip wheel -q --no-deps -w "$work/wheels" acvl-utils==0.2.6
"$PYTHON312" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$work/wheels"/*.whl
mkdir -p .whl
tar -C "$work/site" -cf - . | xz -6 -T2 > .whl/site-py312.tar.xz
ls -1 "$work/wheels"
du -h .whl/site-py312.tar.xz
