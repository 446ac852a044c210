#!/usr/bin/env bash
# The GPU benchmarks in one short run (meant for < 8 minutes on one H100): indexing, attributions,
# icons and placement on CUDA. Needs no internet: the JPEGs are synthesised here (640×480, bench/_work/)
# and InceptionV1 runs with seeded random weights (speed does not depend on the weights).
# Needs torch and torchvision with CUDA, atlasq's dependencies, and for GPU placement the `gpu`
# extra (faiss with GPU support; without it placement runs on the CPU and says so).
#
#     bash bench/gpu.sh            # PYTHON=... to choose the interpreter
#
# Last lines: gpu_images_per_s=, gpu_attribution_positions_per_s=, gpu_icons_20x20_minutes=,
# gpu_placement_seconds_1m=.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log=$(mktemp -d)

"$PY" - <<'PYCODE'
import torch
assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA device"
from atlasq.devices import Availability
print("device:", torch.cuda.get_device_name(0), "|", Availability.probe())
PYCODE

echo "== indexing 4000 JPEGs on CUDA (decode on the GPU, autocast)"
"$PY" bench/index.py --device cuda --images 4000 --batch-size 128 --precision auto | tee "$log/index"
echo "== attributions at K = 1 and 4 on CUDA"
"$PY" bench/index.py --device cuda --attributions --attribution-images 1000 --batch-size 64 --precision auto \
    | tee "$log/attr"
echo "== icons (mixed4c, 80 px, batch 32) on CUDA"
"$PY" bench/atlas.py --device cuda --skip-layout --precision auto --icon-steps 32 --check-steps 0 | tee "$log/icons"
echo "== placement of 1,000,000 activations on a 100,000-activation reference"
"$PY" bench/histogram.py --skip-queries --baseline-queries 2000 | tee "$log/place"

value() { grep "^$1=" "$2" | tail -1 | cut -d= -f2; }
echo "gpu_images_per_s=$(value images_per_s "$log/index")"
echo "gpu_attribution_positions_per_s=$(value attribution_positions_per_s "$log/attr")"
echo "gpu_icons_20x20_minutes=$(value icons_20x20_minutes "$log/icons")"
echo "gpu_placement_seconds_1m=$(value placement_seconds_1m "$log/place")"
