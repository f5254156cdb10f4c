#!/usr/bin/env bash
# Full experiments (i)-(viii) and the optimiser sweep on one GPU, written to $OUT (default ./gpu_results).
# Target: under ~4 minutes on one H100. Run from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_experiments.sh
# Needs jax (CUDA), flax, optax, numpy, scipy, scikit-image, tifffile, matplotlib, orbax; nibabel for tissue.
# Uses the shipped scribblejax/weights/{nuclei2d,tissue2d} when present; without nuclei2d weights it trains
# a 300-step fallback (seconds on a GPU); without tissue2d weights the tissue parts are skipped and say so.
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SCRIBBLEJAX_CACHE="$OUT/cache"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import importlib, jax
missing = [m for m in ("scipy", "skimage", "tifffile", "matplotlib", "orbax", "optax", "flax")
           if importlib.util.find_spec(m) is None]
if importlib.util.find_spec("nibabel") is None:
  print("nibabel missing: the MNI tissue parts cannot load their data and are skipped")
print("devices:", jax.devices())
print("missing modules:", missing or "none")
if missing:
  raise SystemExit(3)
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "missing dependencies: see $OUT/environment.txt"; exit 3; }
start=$(date +%s)
# Everything except the sweep first (so a time-out still leaves these), then the sweep.
timeout 170 python -m scribblejax.research.experiments dice multiclass missed_class new_class shift mark_types \
  region_growing steps_layers --size full --out "$OUT/experiments" 2>&1 | tee "$OUT/experiments.log"
echo "experiments: $(( $(date +%s) - start ))s" | tee -a "$OUT/timing.txt"
timeout 120 python -m scribblejax.research.experiments optimizer_sweep --size full --out "$OUT/experiments" 2>&1 \
  | tee "$OUT/sweep.log"
echo "total: $(( $(date +%s) - start ))s" | tee -a "$OUT/timing.txt"
rm -rf "$OUT/cache"
# one archive, so that a file-count limit on copying $OUT back loses nothing
tar czf "$OUT/experiments.tar.gz" -C "$OUT" experiments
