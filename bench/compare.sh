#!/usr/bin/env bash
# Times metalearn's benchmark workloads and the peer PyTorch / JAX scripts one after the other,
# on the same machine, and prints each workload's time and the ratio metalearn / best peer.
#
#   bash bench/compare.sh PYTHON [REPEATS]
#
# PYTHON is an interpreter with torch and jax installed (for example a venv made with
#   python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch jax jaxlib optax numpy
# ); REPEATS (default 3) is how many times each measurement is repeated; the best (lowest) time
# of the repeats is used for every side. PEERS points to the folder of the peer scripts
# (default: ../shared/bench/peers beside this repository).
set -euo pipefail

PYTHON=${1:?usage: bash bench/compare.sh PYTHON [REPEATS]}
REPEATS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/bench/peers}
[ -d "$PEERS" ] || { echo "peer scripts not found in $PEERS (set PEERS)" >&2; exit 1; }
"$PYTHON" -c "import torch, jax" 2>/dev/null || { echo "$PYTHON lacks torch or jax" >&2; exit 1; }

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/metalearn"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "python: $("$PYTHON" -c 'import torch, jax; print("torch", torch.__version__, "/ jax", jax.__version__)')"

# peer NAME ENV... SCRIPT: appends the script's ms/iter to $OUT/NAME, once per repeat.
peer() {
  local name=$1; shift
  local script=${*: -1}
  local envs=("${@:1:$#-1}")
  for _ in $(seq "$REPEATS"); do
    env "${envs[@]}" "$PYTHON" "$PEERS/$script" 2>/dev/null | grep -o '[0-9.]* ms/iter' | cut -d' ' -f1 >> "$OUT/$name"
  done
}
ours() {
  local workload=$1 iterations=$2
  for _ in $(seq "$REPEATS"); do
    "$BIN" bench --workload "$workload" --iterations "$iterations" --json \
      | "$PYTHON" -c 'import json,sys; print(json.loads(sys.stdin.readline())["ms_per_iter"])' >> "$OUT/ours-$workload"
  done
}

peer torch-protonet-conv4 MODE=proto ITERS=3 conv_torch.py
ours protonet-conv4 3
peer torch-maml-conv4 MODE=maml ITERS=2 conv_torch.py
ours maml-conv4 2
peer torch-fomaml-conv4 MODE=maml FO=1 ITERS=2 conv_torch.py
ours fomaml-conv4 2
peer jax-maml-sine STEPS=1 ITERS=500 maml_sine_jax.py
ours maml-sine 500
peer jax-maml-sine-5 STEPS=5 ITERS=500 maml_sine_jax.py
ours maml-sine-5 500
ours adapt-protonet-conv4 50

"$PYTHON" - "$OUT" <<'PY'
import os, sys
out = sys.argv[1]
def best(name):
    path = os.path.join(out, name)
    values = [float(v) for v in open(path).read().split()] if os.path.exists(path) else []
    return min(values) if values else None
rows = [("protonet-conv4", "torch-protonet-conv4", 0.5), ("maml-conv4", "torch-maml-conv4", 0.5),
        ("fomaml-conv4", "torch-fomaml-conv4", 0.5), ("maml-sine", "jax-maml-sine", 1.0),
        ("maml-sine-5", "jax-maml-sine-5", 1.0)]
print(f"\n| workload | metalearn ms/iter | best peer | peer ms/iter | ratio | target |")
print("| --- | --- | --- | --- | --- | --- |")
for ours, peer, target in rows:
    a, b = best("ours-" + ours), best(peer)
    ratio = f"{a / b:.2f}x" if a and b else "n/a"
    fmt = lambda v: f"{v:.2f}" if v is not None else "n/a"
    print(f"| {ours} | {fmt(a)} | {peer.split('-')[0]} | {fmt(b)} | {ratio} | <= {target}x |")
a = best("ours-adapt-protonet-conv4")
print(f"| adapt-protonet-conv4 | {a:.2f} | - | - | - | < 10 ms |")
PY
