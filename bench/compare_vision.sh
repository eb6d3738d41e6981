#!/bin/bash
# Image-backbone speed, side by side on one machine: metalearn, the PyTorch peer
# (shared/bench/peers/vision/speed_vision.py, both memory layouts), then metalearn again.
#
#   BIN=target/release/metalearn bash bench/compare_vision.sh PYTHON [WEIGHTS] [PEERS]
#
# PYTHON: a Python with torch and timm (see the peers' README); WEIGHTS: EfficientNet-Lite0's
# model.safetensors (default ../shared/models/efficientnet-lite0/model.safetensors); PEERS: the
# peer folder (default ../shared/bench/peers/vision). Prints every run's JSON line; compare
# images_per_sec (batch 32) and the single-image median_ms as ratios.
set -euo pipefail
PYTHON=${1:?usage: compare_vision.sh PYTHON [WEIGHTS] [PEERS]}
WEIGHTS=${2:-../shared/models/efficientnet-lite0/model.safetensors}
PEERS=${3:-../shared/bench/peers/vision}
BIN=${BIN:-target/release/metalearn}
ours() {
    uptime
    "$BIN" bench --workload effnet-lite0-forward --workload effnet-lite0-single \
        --backbone "$WEIGHTS" --json
}
ours
uptime
"$PYTHON" "$PEERS/speed_vision.py" --threads 2 --skip-finetune \
    --model-dir "$(dirname "$WEIGHTS")"
ours
uptime
