#!/usr/bin/env bash
# The full speed suite on one GPU, from the repository root, in about 6 minutes of wall time:
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh          # on the GPU machine (the device tool sets $OUT)
#   SMOKE=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh    # the same steps at tiny sizes, on any machine
#   PACK_TO=/x/suite.tgz OUT=/tmp/suite bash ...           # also packs $OUT into one archive after each part
#
# Works offline with what the machine has: no pip install. The repository goes on PYTHONPATH; the
# script checks the imports first and skips what is missing (torch: no PyTorch reference; a missing
# scikit-image, imported by scribblejax.marks but not used by the benchmark, gets a stub that
# raises if called). Each part has its own time limit and writes its JSON and markdown under $OUT
# after every measurement, so a part cut short keeps what it measured. Writes 11 files:
#   $OUT/suite.log (environment and progress), $OUT/gpu_2d.{json,md}, $OUT/gpu_batch.{json,md},
#   $OUT/gpu_3d.{json,md}, $OUT/gpu_precision.{json,md}, $OUT/gpu_3d_xla_layout.{json,md}
# PARTS="2d 3d layout batch precision" (the default) picks the parts to run, in that order; LIMIT_<PART>
# (seconds) bounds each. PARTS="peer2d peer3d" (about 8.5 minutes) times every PyTorch peer variant
# (torch.compile, CUDA graphs, bf16 autocast) against scribblejax: $OUT/gpu_peer_{2d,3d}.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_suite}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG="$OUT/suite.log"
PY="${PYTHON:-python}"
exec > >(tee -a "$LOG") 2>&1
start=$(date +%s)
echo "== gpu_suite start $(date -u)"

{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: none"
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "skimage"):
  try:
    m = importlib.import_module(name)
    print(name, getattr(m, "__version__", "?"))
  except Exception as err:
    print(name, "MISSING", type(err).__name__, err)
try:
  import jax
  print("jax devices", jax.devices())
except Exception as err:
  print("jax devices: FAILED", err)
try:
  import torch
  print("torch cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception:
  pass
EOF
}

# scikit-image: scribblejax.marks imports skimage.draw at the top; the benchmark never draws marks
# with it. Without it, a stub package (on PYTHONPATH for this run only) lets the import succeed.
if ! "$PY" -c "import skimage.draw" 2>/dev/null; then
  STUB="$(mktemp -d)"
  mkdir -p "$STUB/skimage"
  printf '"""Stub for the benchmark run only: scikit-image is not installed."""\n' > "$STUB/skimage/__init__.py"
  cat > "$STUB/skimage/draw.py" <<'EOF'
"""Stub for the benchmark run only: scikit-image is not installed."""
def __getattr__(name):
  def missing(*args, **kwargs):
    raise ImportError(f"scikit-image is not installed (skimage.draw.{name})")
  return missing
EOF
  export PYTHONPATH="$PYTHONPATH:$STUB"
  echo "scikit-image missing: using a stub for skimage.draw"
fi

if ! "$PY" -c "import scribblejax, benchmarks.speed" ; then
  echo "cannot import scribblejax: see the error above; stopping"
  exit 1
fi
# the researcher's loop as it was, and the peer without compilation (trunk cached, no host sync; CUDA
# graphs): the parts below need no torch.compile time. The "peer2d" and "peer3d" parts add torch.compile.
VARIANTS_TORCH="torch_eager,torch_eager_early_stop,torch_cached,torch_cached_early_stop,torch_cuda_graphs,torch_cuda_graphs_early_stop"
BATCH_TORCH="torch_eager,torch_cuda_graphs"
# Every PyTorch peer against scribblejax in float32, bf16 and with early stop, timed in turns.
VARIANTS_PEER="scribblejax,scribblejax_early_stop,scribblejax_bf16,torch_eager,torch_cached,torch_cached_early_stop,torch_cached_bf16,torch_compiled,torch_compiled_early_stop,torch_compiled_bf16,torch_cuda_graphs,torch_cuda_graphs_early_stop,torch_cuda_graphs_bf16,torch_compiled_cuda_graphs,torch_compiled_cuda_graphs_early_stop,torch_compiled_cuda_graphs_bf16"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "torch missing: no PyTorch reference"
fi

if [ "${SMOKE:-0}" = "1" ]; then
  CASES_2D="2d32"; CASES_3D="3d16"; BATCHES="2"; COMMON="--channels 4,8 --repeats 1"
  STEPS_2D=3; STEPS_3D=2; BATCH_STEPS=2; LIMIT_2D=600; LIMIT_BATCH=600; LIMIT_3D=600; LIMIT_PRECISION=600
  LIMIT_LAYOUT=600; CASES_PRECISION="2d32,3d16"; CASES_LAYOUT="3d16"
  CASES_PEER_2D="2d32"; CASES_PEER_3D="3d16"; LIMIT_PEER2D=600; LIMIT_PEER3D=600
else
  CASES_2D="2d256,2d512"; CASES_3D="3d64,3d96,3d128"; BATCHES="8,32"; COMMON="--repeats 3"
  STEPS_2D=100; STEPS_3D=50; BATCH_STEPS=20
  LIMIT_2D=${LIMIT_2D:-130}; LIMIT_BATCH=${LIMIT_BATCH:-100}; LIMIT_3D=${LIMIT_3D:-150}
  LIMIT_PRECISION=${LIMIT_PRECISION:-90}; LIMIT_LAYOUT=${LIMIT_LAYOUT:-60}
  CASES_PRECISION="3d96,2d512"; CASES_LAYOUT="3d96,3d128"
  CASES_PEER_2D="${CASES_PEER_2D:-2d256}"; CASES_PEER_3D="${CASES_PEER_3D:-3d96}"
  LIMIT_PEER2D=${LIMIT_PEER2D:-290}; LIMIT_PEER3D=${LIMIT_PEER3D:-230}
fi

pack() {  # the results so far, as one archive (the device tool brings back at most 8 files)
  [ -n "${PACK_TO:-}" ] || return 0
  tar czf "$PACK_TO.tmp" -C "$OUT" . && mv "$PACK_TO.tmp" "$PACK_TO"
}

run_part() {  # name, time limit (s), arguments...
  local name=$1 limit=$2; shift 2
  echo "== part $name (limit ${limit}s) at +$(( $(date +%s) - start ))s"
  timeout --signal=INT --kill-after=15 "$limit" "$PY" -m benchmarks.speed "$@" --out "$OUT/$name.json"
  echo "== part $name exit $? at +$(( $(date +%s) - start ))s"
  pack
}

PARTS="${PARTS:-2d 3d layout batch precision}"
for part in $PARTS; do
  case "$part" in
    # One interaction, 2D: fixed steps and early stop; what the cached trunk buys (full_forward) and a
    # later interaction on the same image (trunk_reused); the PyTorch eager reference (cuDNN benchmark
    # mode, TF32 as both default); the logit check.
    2d) run_part gpu_2d "$LIMIT_2D" --cases "$CASES_2D" --batches 1 --steps "$STEPS_2D" $COMMON \
          --variants "scribblejax,scribblejax_early_stop,scribblejax_trunk_reused_early_stop,scribblejax_full_forward,$VARIANTS_TORCH" ;;
    # Batches (2D 256^2): batch schemes against torch one image at a time ("vmap", grouped
    # convolutions, is left out: it did not finish compiling within its limit on an H100).
    # "scribblejax" is the default scheme ("auto": "matmul" on GPUs); one image takes the same steps.
    batch) run_part gpu_batch "$LIMIT_BATCH" --cases "${CASES_2D%%,*}" --batches "1,$BATCHES" \
             --steps "$BATCH_STEPS" $COMMON --repeats 2 --no-check \
             --variants "scribblejax,scribblejax_sequential,scribblejax_shifted,$BATCH_TORCH" ;;
    # One interaction, 3D.
    3d) run_part gpu_3d "$LIMIT_3D" --cases "$CASES_3D" --batches 1 --steps "$STEPS_3D" $COMMON \
          --variants "scribblejax,scribblejax_early_stop,torch_eager" ;;
    # bf16 compute and layer-wise remat against float32, with XLA's compiled-memory analysis.
    precision) run_part gpu_precision "$LIMIT_PRECISION" --cases "$CASES_PRECISION" --batches 1 \
                 --steps "$STEPS_3D" $COMMON --no-check --memory \
                 --variants "scribblejax,scribblejax_bf16,scribblejax_remat" ;;
    # 3D with the cuDNN layouts XLA:GPU picks itself (channels-first for 3D on Hopper) instead of the
    # channels-last layouts scribblejax asks for.
    layout) SCRIBBLEJAX_FORCE_CONV_NHWC=0 run_part gpu_3d_xla_layout "$LIMIT_LAYOUT" --cases "$CASES_LAYOUT" \
              --batches 1 --steps "$STEPS_3D" $COMMON --no-check --variants "scribblejax,scribblejax_bf16" ;;
    # Every PyTorch peer (trunk cached; torch.compile; CUDA graphs; bf16 autocast; early stop) against
    # scribblejax, all in turns in one run; each record's ratio is against the strongest PyTorch
    # variant of its case, precision and stopping rule. torch.compile's time is each record's compile_s.
    peer2d) run_part gpu_peer_2d "$LIMIT_PEER2D" --cases "$CASES_PEER_2D" --batches 1 --steps "$STEPS_2D" $COMMON \
              --variants "$VARIANTS_PEER" --notes "gpu_suite.sh part peer2d" ;;
    peer3d) run_part gpu_peer_3d "$LIMIT_PEER3D" --cases "$CASES_PEER_3D" --batches 1 --steps "$STEPS_3D" $COMMON \
              --variants "$VARIANTS_PEER" --notes "gpu_suite.sh part peer3d" ;;
    *) echo "unknown part $part (known: 2d batch 3d precision layout peer2d peer3d)" ;;
  esac
done

echo "== gpu_suite done in $(( $(date +%s) - start ))s; results in $OUT"
ls -la "$OUT"
pack
