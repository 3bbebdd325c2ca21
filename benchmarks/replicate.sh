#!/usr/bin/env bash
# The paper's three stages on its 24-layer layouts (issue #17), one seed, its plans in parallel on one GPU.
#   bash benchmarks/replicate.sh SEED DATA_DIR OUT_DIR [extra replicate.py flags]
# The schedule is issue #17's (docs/results.md): stage 1 1,600 steps x 32 x 1,024, stage 2 300 x 4 x 8,192
# (attention only), stage 3 40 x 4 x 8,192 of long-context QA at lr 5e-5. A plan alone trains all three stages
# in 151 s on an H100, and a call of three at once took 387-496 s with their evaluation (they share the GPU),
# but over 530 s as the first call on a machine just started (two of the three were cut and finished by the
# same line in the next call, below), so a call trains a group:
#   REPLICATE_PLANS="standard ma ma_offset" timeout -s INT 530 bash benchmarks/replicate.sh 17 .rep OUT \
#       --save-every 100 --reuse-stages
# (530 s leaves the grace below, the wheels' install and the tar inside a 600 s call.)
# A call cut short is continued by the same line on the same (warm) machine: each stage goes on from its
# last --save-every checkpoint; a stage with its DONE file is kept.
# DATA_DIR is a folder made by `python benchmarks/replicate.py ... --prepare-only --workdir DIR` (its data/ inside).
# Each plan trains on its own copy of the data (streaming keys shared memory by local path).
set -u
seed=$1 data=$2 out=$3; shift 3
# REPLICATE_PLANS: a subset (a group that one call trains to its end, so that its results come back with it)
plans=${REPLICATE_PLANS:-standard all_sliding ma ma_endslide ma_offset ma_pairs ma_offset_slideshare ma_pairs_slideshare}
cd "$(dirname "$0")/.."
mkdir -p "$out/logs"
# each plan's workdir is fixed by seed and plan (not a new temporary one per call), so that the same line run
# again with --reuse-stages finds the checkpoints the last call left; the data is copied there once
work=${REPLICATE_WORK:-/tmp/replicate-work}
pids=() names=()
for p in $plans; do
  w="$work/${p}_s${seed}"
  mkdir -p "$w"; [ -d "$w/data" ] || cp -r "$data/data" "$w/"
  python3 benchmarks/replicate.py --size 24l --short 1024 --long 8192 --window 256 --steps 1600 --long-steps 300 \
      --qa-steps 40 --qa-lr 5e-5 --short-rope-theta 5e5 --long-rope-theta 8e6 --long-trainable attention \
      --plans "$p" --seed "$seed" --workdir "$w" --name "rep24_${p}_s${seed}" --out "$out" "$@" \
      > "$out/logs/$p.txt" 2>&1 &
  pids+=($!) names+=("$p")
done
# a call's time limit (timeout -s INT) reaches this shell, not the plans: pass it on, so that no plan trains
# on into the next call (each one's last --save-every checkpoint is where --reuse-stages goes on); a plan still
# there REPLICATE_GRACE seconds later (one hung in its shutdown, as two did on an H200) is killed,
# so that the call ends inside its limit and its output comes back
killer=""
trap 'kill -TERM "${pids[@]}" 2>/dev/null; ( sleep "${REPLICATE_GRACE:-20}"; kill -KILL "${pids[@]}" 2>/dev/null ) & killer=$!' INT TERM
for i in "${!pids[@]}"; do
  while :; do  # a wait the trap interrupted returns 128+signal, not the plan's status: wait again
    wait "${pids[$i]}"; rc=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  echo "${names[$i]}: exit $rc"
done
[ -n "$killer" ] && kill "$killer" 2>/dev/null  # every plan has ended: no pid of theirs is killed later
exit 0
