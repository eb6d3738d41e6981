#!/usr/bin/env bash
# Times metalearn's benchmark workloads and the peer PyTorch / JAX scripts one after the other,
# on the same machine, and prints each workload's time and the ratio metalearn / best peer.
#
#   bash bench/compare.sh PYTHON [REPEATS]
#
# PYTHON is an interpreter with torch and jax installed (for example a venv made with
#   python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch jax jaxlib optax numpy
# ); REPEATS (default 3) is how many times each measurement is repeated; the best (lowest) time
# of the repeats is used for every side. Environment:
#   PEERS   folder of the peer scripts (default: ../shared/bench/peers beside this repository)
#   DEVICE  cpu (default) or cuda: on cuda, metalearn runs with --cuda, the PyTorch scripts run
#           on the GPU through bench/on_gpu.py, JAX uses the GPU, and the peers' conv workloads
#           in JAX and sinusoid workloads in PyTorch are timed too (on the CPU they are far
#           slower than the other peer, so they are skipped there)
#   BIN     a metalearn binary to time (default: built here with cargo, `--features cuda` on cuda)
#   SINE_ITERS  timed iterations of the sinusoid workloads (default 500 on cpu, 50 on cuda)
set -euo pipefail

PYTHON=${1:?usage: bash bench/compare.sh PYTHON [REPEATS]}
REPEATS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/bench/peers}
DEVICE=${DEVICE:-cpu}
[ -d "$PEERS" ] || { echo "peer scripts not found in $PEERS (set PEERS)" >&2; exit 1; }
case "$DEVICE" in
  cpu) OURS_FLAGS=(); FEATURES=(); JAX_DEVICE=cpu; SINE_ITERS=${SINE_ITERS:-500} ;;
  cuda) OURS_FLAGS=(--cuda); FEATURES=(--features cuda); JAX_DEVICE=cuda; SINE_ITERS=${SINE_ITERS:-50} ;;
  *) echo "DEVICE must be cpu or cuda, not $DEVICE" >&2; exit 1 ;;
esac
"$PYTHON" -c "import torch, jax" 2>/dev/null || { echo "$PYTHON lacks torch or jax" >&2; exit 1; }

if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet "${FEATURES[@]}" --manifest-path "$ROOT/Cargo.toml"
  BIN="$ROOT/target/release/metalearn"
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
if [ "$DEVICE" = cuda ]; then
  echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo unknown)"
fi
echo "python: $("$PYTHON" -c 'import torch, jax; print("torch", torch.__version__, "/ jax", jax.__version__)')"

# peer NAME ENV... SCRIPT: appends the script's ms/iter to $OUT/NAME, once per repeat. A peer
# that fails is reported and left out of the table.
peer() {
  local name=$1; shift
  local script=${*: -1}
  local envs=("${@:1:$#-1}")
  local runner=("$PYTHON")
  if [ "$DEVICE" = cuda ] && [[ $script == *torch* ]]; then
    runner=("$PYTHON" "$ROOT/bench/on_gpu.py")
  fi
  for _ in $(seq "$REPEATS"); do
    env "${envs[@]}" JAX_PLATFORMS="$JAX_DEVICE" "${runner[@]}" "$PEERS/$script" > "$OUT/log" 2>&1 \
      || { echo "peer $name failed:" >&2; head -5 "$OUT/log" >&2; return 0; }
    grep -o '[0-9.]* ms/iter' "$OUT/log" | cut -d' ' -f1 >> "$OUT/$name"
  done
}
ours() {
  local workload=$1 iterations=$2
  for _ in $(seq "$REPEATS"); do
    "$BIN" bench --workload "$workload" --iterations "$iterations" --json "${OURS_FLAGS[@]}" > "$OUT/log" 2>&1 \
      || { echo "metalearn $workload failed:" >&2; head -5 "$OUT/log" >&2; return 0; }
    "$PYTHON" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["ms_per_iter"])' \
      "$OUT/log" >> "$OUT/ours-$workload"
  done
}

peer torch-protonet-conv4 MODE=proto ITERS=3 conv_torch.py
ours protonet-conv4 3
peer torch-maml-conv4 MODE=maml ITERS=2 conv_torch.py
ours maml-conv4 2
peer torch-fomaml-conv4 MODE=maml FO=1 ITERS=2 conv_torch.py
ours fomaml-conv4 2
peer jax-maml-sine STEPS=1 ITERS=500 maml_sine_jax.py
ours maml-sine "$SINE_ITERS"
peer jax-maml-sine-5 STEPS=5 ITERS=500 maml_sine_jax.py
ours maml-sine-5 "$SINE_ITERS"
ours adapt-protonet-conv4 50
if [ "$DEVICE" = cuda ]; then
  peer jax-protonet-conv4 MODE=proto ITERS=10 conv_jax.py
  peer jax-maml-conv4 MODE=maml ITERS=5 conv_jax.py
  peer torch-maml-sine STEPS=1 ITERS="$SINE_ITERS" maml_sine_torch.py
  peer torch-maml-sine-5 STEPS=5 ITERS="$SINE_ITERS" maml_sine_torch.py
fi

"$PYTHON" - "$OUT" "$DEVICE" <<'PY'
import os, sys
out, device = sys.argv[1], sys.argv[2]
def best(name):
    path = os.path.join(out, name)
    values = [float(v) for v in open(path).read().split()] if os.path.exists(path) else []
    return min(values) if values else None
# Targets were set for the CPU; on a GPU the table reports the ratios without them.
rows = [("protonet-conv4", 0.5), ("maml-conv4", 0.5), ("fomaml-conv4", 0.5),
        ("maml-sine", 1.0), ("maml-sine-5", 1.0)]
fmt = lambda v: f"{v:.2f}" if v is not None else "n/a"
print(f"\n| workload ({device}) | metalearn ms/iter | best peer | peer ms/iter | ratio | target |")
print("| --- | --- | --- | --- | --- | --- |")
for workload, target in rows:
    ours = best("ours-" + workload)
    peers = [(best(f"{p}-{workload}"), p) for p in ("torch", "jax")]
    peers = [(t, p) for t, p in peers if t is not None]
    peer_time, peer = min(peers) if peers else (None, "n/a")
    ratio = f"{ours / peer_time:.2f}x" if ours and peer_time else "n/a"
    goal = f"<= {target}x" if device == "cpu" else "-"
    print(f"| {workload} | {fmt(ours)} | {peer} | {fmt(peer_time)} | {ratio} | {goal} |")
goal = "< 10 ms" if device == "cpu" else "-"
print(f"| adapt-protonet-conv4 | {fmt(best('ours-adapt-protonet-conv4'))} | - | - | - | {goal} |")
if device == "cuda":
    print("\nevery peer timing (best of the repeats, ms/iter):")
    for name in sorted(os.listdir(out)):
        if name not in ("log",) and not name.startswith("ours-"):
            print(f"  {name}: {fmt(best(name))}")
PY
