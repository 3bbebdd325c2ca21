#!/usr/bin/env bash
# benchmarks/replicate.py for several plans and seeds at once: the data are
# prepared once, each run gets its own copy (streaming decompresses shards in
# place, and two runs on one compressed dataset race: docs/reliability.md),
# runs are spread over the GPUs, several per GPU, and each seed's rows are
# merged into benchmarks/results/replication/replication_NAME_seedS.json (or $OUT).
#
#   PLANS="standard ma ma_swa_shared" SEEDS="17 18" GPUS=2 NAME=40m12 \
#     benchmarks/replicate_parallel.sh --size 40m12 --steps 1200 --long-steps 250
set -euo pipefail
cd "$(dirname "$0")/.."
PLANS=${PLANS:-"standard ma ma_swa_shared"}
SEEDS=${SEEDS:-17}
GPUS=${GPUS:-1}
NAME=${NAME:-run}
WORK=${WORK:-/tmp/replicate_parallel}
RESULTS=${OUT:-benchmarks/results/replication}
PY=${PYTHON:-python3}
mkdir -p "$WORK/raw" "$RESULTS"
$PY benchmarks/replicate.py "$@" --workdir "$WORK/prep" --prepare-only
i=0
pids=()
for seed in $SEEDS; do
  for plan in $PLANS; do
    dir="$WORK/s${seed}_${plan}"
    mkdir -p "$dir" && cp -r "$WORK/prep/data" "$dir/"
    CUDA_VISIBLE_DEVICES=$((i % GPUS)) $PY benchmarks/replicate.py "$@" --seed "$seed" --plans "$plan" \
      --workdir "$dir" --name "rep_${plan}_s${seed}" --out "$WORK/raw" > "$WORK/s${seed}_${plan}.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for seed in $SEEDS; do
  files=()
  for plan in $PLANS; do
    f="$WORK/raw/rep_${plan}_s${seed}.json"
    if [ -f "$f" ]; then files+=("$f"); else echo "no result for $plan seed $seed: see $WORK/s${seed}_${plan}.log"; tail -20 "$WORK/s${seed}_${plan}.log"; fi
  done
  [ ${#files[@]} -gt 0 ] && $PY benchmarks/replicate.py --merge "${files[@]}" --name "replication_${NAME}_seed${seed}" --out "$RESULTS"
done
exit $status
