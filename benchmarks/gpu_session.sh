#!/usr/bin/env bash
# What the next session with a GPU should run first, in one call (at most about 9 minutes by the parts' time
# limits; not yet run on a GPU): the
# open questions of issue 6 after 2026-11-27.
#   1. float32 2D under XLA options not yet measured, against the default, and bf16, with kernel
#      profiles (gpu_probe.sh parts "base", "bf16" and "flags", 2D 256^2 and 512^2), summed by kernel
#      class into summary.jsonl (gpu_probe.py --summarise: what the matrix products alone take);
#   2. one interaction in 2D with the trunk computed per call, reused from an earlier interaction,
#      and the whole network each step, against PyTorch (gpu_suite.sh part "2d");
#   PEER=1, instead of all else (one call, at most about 9 minutes by the parts' limits): every PyTorch
#      peer (trunk cached, torch.compile, CUDA graphs, bf16 autocast, early stop) against scribblejax at
#      2D 256^2 (100 steps) and 3D 96^3 (50 steps; CASES_PEER_2D / CASES_PEER_3D pick others), in turns in
#      one run, ratios against the strongest PyTorch variant (gpu_suite.sh parts "peer2d" and "peer3d"; $OUT/suite/gpu_peer_*.json);
#   3. with PATCH_MEMORY=1, instead of 1 and 2 (a second call, at most 5 minutes): XLA's compiled memory of
#      refinement on 8 marked 128^3 patches of nnU-Net's 3d_fullres U-Net, all at once against
#      batches of 4 and 1, with and without mirroring, in the loop refine runs (MarkedPatches;
#      benchmarks/patch_memory.py).
# From the repository root, with the device tool's output folder:
#
#   OUT=$OUT/session bash benchmarks/gpu_session.sh        # writes $OUT/session.tgz as well
#   PEER=1 OUT=$OUT/peer bash benchmarks/gpu_session.sh    # the PyTorch peers; writes $OUT/peer.tgz
#   SMOKE=1 OUT=/tmp/gpu_session bash benchmarks/gpu_session.sh   # the same steps at tiny sizes, any machine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ "${PEER:-0}" = "1" ]; then
  if [ "${SMOKE:-0}" = "1" ]; then
    SMOKE=1 PARTS="peer2d peer3d" OUT="$OUT/suite" bash benchmarks/gpu_suite.sh
  else
    PARTS="peer2d peer3d" OUT="$OUT/suite" bash benchmarks/gpu_suite.sh
  fi
elif [ "${PATCH_MEMORY:-0}" = "1" ]; then
  if [ "${SMOKE:-0}" = "1" ]; then SIZE="--patch 16 --stages 3"; else SIZE="--patch 128 --stages 6"; fi
  PYTHONPATH="$PWD" timeout 300 "${PYTHON:-python3}" -m benchmarks.patch_memory $SIZE --chunks all,4,1 --mirror --variants marked_patches \
    --out "$OUT/patch_memory.json" > "$OUT/patch_memory.log" 2>&1 || echo "== patch_memory failed or timed out"
elif [ "${SMOKE:-0}" = "1" ]; then
  CASES=2d32 PARTS="base bf16 flags" BATCH=2 BATCH_CASE=2d32 CASES_FLAGS=2d32 OUT="$OUT/probe" bash benchmarks/gpu_probe.sh
  SMOKE=1 PARTS=2d OUT="$OUT/suite" bash benchmarks/gpu_suite.sh
else
  CASES=2d256,2d512 PARTS="base bf16 flags" BATCH=8 OUT="$OUT/probe" bash benchmarks/gpu_probe.sh
  PARTS=2d OUT="$OUT/suite" bash benchmarks/gpu_suite.sh
fi
if [ -f "$OUT/probe/probe.jsonl" ]; then
  PYTHONPATH="$PWD" "${PYTHON:-python3}" -m benchmarks.gpu_probe --summarise "$OUT/probe/probe.jsonl" > "$OUT/summary.jsonl"
fi
tar czf "$OUT.tgz.tmp" -C "$OUT" . && mv "$OUT.tgz.tmp" "$OUT.tgz"
echo "== gpu_session: $OUT.tgz"
