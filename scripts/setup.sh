#!/usr/bin/env bash
# Set up refseg in ./.venv: PyTorch + torchvision (the ordinary builds; they also run on CPU),
# Meta's sam2 package (built without its optional CUDA extension), then refseg itself.
#   EXTRAS=test bash scripts/setup.sh   also installs what the tests need (FiftyOne, its MongoDB, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-fiftyone}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "torch>=2.3" "torchvision>=0.18"
# sam2 is an sdist that imports torch while building: build it against the torch just installed
SAM2_BUILD_CUDA=0 "${PIP[@]}" --no-build-isolation "sam2==1.1.0"
"${PIP[@]}" -e ".[${EXTRAS}]"
echo "refseg is installed in .venv ($(.venv/bin/refseg --version))"
