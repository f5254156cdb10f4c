#!/usr/bin/env bash
# Several configurations of the refinement loop on one GPU, one process each (benchmarks/gpu_probe.py),
# with kernel profiles. Parts (PARTS, default "base bf16 xla_layout cmdbuf_while"): the default (with
# the optimised HLO of the loop), bf16 compute, the cuDNN layouts XLA picks itself, XLA's command
# buffers (CUDA graphs) over the whole while loop; and "flags": float32 2D under XLA options not yet
# measured (cuDNN GEMM fusions, exhaustive Triton tiling, no Triton GEMMs, block-level fusion
# rewriting), each against "base" for the float32 2D targets of issue 6. From the repository root:
#
#   OUT=/some/folder bash benchmarks/gpu_probe.sh
#   PARTS="base flags" CASES=2d256,2d512 OUT=/some/folder bash benchmarks/gpu_probe.sh
#
# Writes $OUT/probe.jsonl (one line per measurement), $OUT/probe.log and $OUT/hlo.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_probe}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
exec > >(tee -a "$OUT/probe.log") 2>&1
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

CASES="${CASES:-2d256,2d512,3d96}"
ALL_CMDBUF="FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
probe() {  # label, time limit (s), env assignments..., -- probe arguments...
  local label=$1 limit=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  echo "== $label (limit ${limit}s) at +$(( $(date +%s) - start ))s: ${envs[*]}"
  env "${envs[@]}" timeout --signal=INT --kill-after=10 "$limit" "$PY" -m benchmarks.gpu_probe --out "$OUT" \
    --label "$label" "$@"
  echo "== $label exit $? at +$(( $(date +%s) - start ))s"
}

for part in ${PARTS:-base bf16 xla_layout cmdbuf_while}; do
  case "$part" in
    base) probe base 100 "XLA_FLAGS=--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*loop_program.*" -- \
            --cases "$CASES" --trace --batch "${BATCH:-32}" --batch-case "${BATCH_CASE:-2d256}" ;;
    bf16) probe bf16 60 -- --cases "$CASES" --dtypes bfloat16 --trace ;;
    xla_layout) probe xla_layout 40 SCRIBBLEJAX_FORCE_CONV_NHWC=0 -- --cases "${CASES_3D:-3d96}" --trace ;;
    cmdbuf_while) probe cmdbuf_while 50 "XLA_FLAGS=--xla_gpu_enable_command_buffer=$ALL_CMDBUF --xla_gpu_graph_min_graph_size=1" -- \
            --cases "${CASES_QUICK:-2d256,3d96}" --trace ;;
    flags)  # each flag name was checked against jaxlib 0.10.2 (an unknown one aborts the process)
      for flag in --xla_gpu_cudnn_gemm_fusion_level=2 --xla_gpu_exhaustive_tiling_search=true \
                  --xla_gpu_enable_triton_gemm=false --xla_gpu_experimental_enable_fusion_block_level_rewriter=true; do
        name=${flag#--xla_gpu_}
        probe "flag_${name%%=*}" 45 "XLA_FLAGS=$flag" -- --cases "${CASES_FLAGS:-2d256,2d512}" --trace
      done ;;
    *) echo "unknown part $part" ;;
  esac
done

(cd "$OUT" && find hlo -name '*after_optimizations.txt' | tar czf hlo.tgz -T - 2>/dev/null; rm -rf hlo)
echo "== done in $(( $(date +%s) - start ))s"
ls -la "$OUT"
