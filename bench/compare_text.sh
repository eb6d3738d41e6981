#!/usr/bin/env bash
# Text speed, side by side: metalearn's encode-minilm, encode-minilm-single and finetune-minilm
# workloads and the peers (sentence-transformers' encode_bench.py, bench/finetune_minilm_torch.py),
# one after the other, REPEATS times, then the ratios of the best runs.
#
#   BIN=target/release/metalearn bash bench/compare_text.sh PYTHON MODEL_DIR DATA_FULL_JSON PEERS_DIR [REPEATS]
#
# PYTHON has torch, transformers and sentence-transformers; PEERS_DIR holds encode_bench.py.
set -euo pipefail
PY=$1 M=$2 D=$3 PEERS=$4 REPEATS=${5:-2}
BIN=${BIN:-target/release/metalearn}
HERE=$(cd "$(dirname "$0")" && pwd)
best() { sort -g | head -1; }
ours_encode=() ours_single=() ours_tune=() st_encode=() st_single=() torch_tune=()
for _ in $(seq "$REPEATS"); do
    ours=$("$BIN" bench --workload encode-minilm --workload encode-minilm-single \
        --workload finetune-minilm --iterations 3 --encoder "$M" --data "$D" --json)
    ours_encode+=("$(echo "$ours" | sed -n 1p | python3 -c 'import json,sys;print(1000/json.load(sys.stdin)["sentences_per_sec"])')")
    ours_single+=("$("$BIN" bench --workload encode-minilm-single --encoder "$M" --data "$D" --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["median_ms"])')")
    ours_tune+=("$("$BIN" bench --workload finetune-minilm --iterations 20 --encoder "$M" --data "$D" --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["median_ms"])')")
    peer=$("$PY" "$PEERS/encode_bench.py" "$M" "$D" 2>/dev/null | tail -1)
    st_encode+=("$(echo "$peer" | python3 -c 'import json,sys;print(json.load(sys.stdin)["sorted_ms_per_sent_best"])')")
    st_single+=("$(echo "$peer" | python3 -c 'import json,sys;print(json.load(sys.stdin)["single_ms_median"])')")
    torch_tune+=("$("$PY" "$HERE/finetune_minilm_torch.py" "$M" "$D" --steps 20 2>/dev/null | tail -1 | python3 -c 'import json,sys;print(json.load(sys.stdin)["median_ms"])')")
done
row() {
    local name=$1 ours peer
    ours=$(printf '%s\n' "${@:2:$REPEATS}" | best)
    peer=$(printf '%s\n' "${@:$((REPEATS + 2))}" | best)
    python3 -c "print(f'| $name | {float($ours):.3f} | {float($peer):.3f} | {float($ours)/float($peer):.2f}x |')"
}
echo "| workload (ms, best of $REPEATS) | metalearn | peer | ratio |"
echo "| --- | --- | --- | --- |"
row "encode, batch 32, ms per sentence (sentence-transformers, length-sorted)" "${ours_encode[@]}" "${st_encode[@]}"
row "one sentence at a time, median ms" "${ours_single[@]}" "${st_single[@]}"
row "fine-tuning step, 32 sentences, median ms (PyTorch)" "${ours_tune[@]}" "${torch_tune[@]}"
