#!/usr/bin/env bash
# One-step setup for steerflow: PyTorch (if missing), then steerflow with its test extras.
# Where no torch is installed we ask pip for torch==2.13.0 (a CPU build on machines that carry it,
# the normal wheel elsewhere); an existing torch >= 2.3 is kept as it is.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 3))" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.3"
fi
"$PY" -m pip install -q -e ".[test,ot]"
# Reference libraries the benchmarks and parity tests compare against. Installed without their
# dependencies: torchcfm would otherwise pull torchvision and a second torch (see shared/ANCHORS.md).
"$PY" -m pip install -q --no-deps "torchcfm==1.0.7" "flow-matching==1.0.10" "torchdiffeq==0.2.5" || \
  echo "setup.sh: reference libraries (torchcfm, flow-matching) not installed; parity tests will be skipped" >&2
