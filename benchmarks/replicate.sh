#!/usr/bin/env bash
# The paper's three stages on its 24-layer layouts (issue #17), one seed, eight plans in parallel on one GPU.
#   bash benchmarks/replicate.sh SEED DATA_DIR OUT_DIR [extra replicate.py flags]
# DATA_DIR is a folder made by `python benchmarks/replicate.py ... --prepare-only --workdir DIR` (its data/ inside).
# Each plan trains on its own copy of the data (streaming keys shared memory by local path).
set -u
seed=$1 data=$2 out=$3; shift 3
plans="standard all_sliding ma ma_endslide ma_offset ma_pairs ma_offset_slideshare ma_pairs_slideshare"
cd "$(dirname "$0")/.."
mkdir -p "$out/logs"
for p in $plans; do
  w=$(mktemp -d); cp -r "$data/data" "$w/"
  ( python3 benchmarks/replicate.py --size 24l --short 1024 --long 8192 --window 256 --steps 400 --long-steps 100 \
      --qa-steps 40 --short-rope-theta 5e5 --long-rope-theta 8e6 --long-trainable attention \
      --plans "$p" --seed "$seed" --workdir "$w" --name "rep24_${p}_s${seed}" --out "$out" "$@" \
      > "$out/logs/$p.txt" 2>&1; echo "$p: exit $?" ) &
done
wait
