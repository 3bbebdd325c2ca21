#!/usr/bin/env bash
# Issue #18's batch-1 bars in one GPU call (the 1.3B decode model of benchmarks/decode.py, batch 1, 8K and 32K):
#   bash benchmarks/batch1.sh [OUT_DIR] [SUFFIX]
# In order, each part under its own time limit, so that a call of 600 s ends with what it has:
#   1. the persistent kernel's GPU test against the default path's logits (tests/gpu/test_gpu_persistent.py);
#   2. the persistent kernel (--persistent, with each point's kernel profile): each row's persistent_in_kernel
#      says whether its steps ran in the kernel or fell back (and stderr says why);
#   3. the path without the kernel (the default today: the bars' numbers) side by side, on the same machine;
#   4. with BATCH1_MORE=1, the kernel's options one at a time against part 2 (about 80 s each).
# JSONs go to OUT_DIR (default benchmarks/results/decode) as decode_persistent${SUFFIX}.json,
# decode_default${SUFFIX}.json and decode_persistent_<option>${SUFFIX}.json (SUFFIX default _batch1, so that
# no result the docs quote is overwritten; name the card in it, e.g. _h200). A part that fails or runs out of
# time does not stop the next. Compare rows only within one call (one machine): the floors use its bandwidth.
set -u
out=${1:-benchmarks/results/decode} suffix=${2:-_batch1}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mkdir -p "$out"
b=(python3 benchmarks/decode.py --batches 1 --contexts 8192 32768 --no-budget --no-compare --iters 30 --out "$out")
part() {  # part NAME SECONDS COMMAND...: run it under a limit, say how it ended and when
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s)"
  timeout -k 10 -s INT "$limit" "$@"
  echo "=== $name: exit $? at ${SECONDS} s"
}
part "persistent kernel vs default logits (GPU test)" "${BATCH1_TEST_S:-200}" \
  python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_gpu_persistent.py -k default_steps_logits
part "persistent kernel" "${BATCH1_PERSISTENT_S:-150}" \
  "${b[@]}" --plans ma standard ma_offset ma_pairs --persistent --profile --name "decode_persistent$suffix"
part "default path" "${BATCH1_DEFAULT_S:-200}" \
  "${b[@]}" --plans ma standard ma_offset --no-persistent --name "decode_default$suffix"
if [ "${BATCH1_MORE:-0}" = 1 ]; then
  for opt in HEAD_FLAGS=true L2_PREFETCH=true NUM_WARPS=4; do
    n=$(echo "${opt%%=*}" | tr '[:upper:]' '[:lower:]')
    part "persistent kernel, $opt" 80 \
      "${b[@]}" --plans ma --persistent --persistent-kernel "$opt" --name "decode_persistent_$n$suffix"
  done
fi
exit 0
