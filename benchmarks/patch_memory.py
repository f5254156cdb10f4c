"""Device memory of refinement on many patches: :class:`scribblejax.pipeline.PatchBlend` in batches.

With nnU-Net's sliding window (half-patch steps), one marked voxel of a volume lies in up to 8
patches, and test-time mirroring runs each patch 8 times. The refinement loop runs every marked
patch; this measures, from XLA's own analysis of the compiled programs
(:func:`scribblejax.refinement.memory_analysis`, nothing is run), how the peak memory grows with the patches
that one network call runs (``PatchBlend(chunk=...)``).

The network is nnU-Net's ``PlainConvUNet`` of a ``3d_fullres`` plan (features 32, 64, 128, 256,
320, ..., two 3x3x3 convolutions per stage, instance norm, leaky ReLU), random weights; the marked
patches form a 2x2x2 block with half-patch overlaps. Usage::

  python -m benchmarks.patch_memory                                  # 64^3 patches, 8 of them
  python -m benchmarks.patch_memory --patch 128 --stages 6 --chunks all,4,1 --out r.json

Each record holds ``device``, ``variant`` ("patch_blend"), ``patch``, ``patches``, ``passes``
(mirrored copies per patch), ``chunk`` (patches per network call; ``null``: all at once),
``layers``, ``peak_bytes``, each compiled program's bytes, ``compile_s`` (of the analysis) and
versions; with ``--steps N``, also ``ms_per_step``: one refinement of N steps (early stop off), the
median of ``--repeats`` runs after a first one that compiles (``run_compile_s``: the first run less
the median).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np


def nnunet_fullres(stages: int, classes: int = 3, seed: int = 0):
  """nnU-Net's PlainConvUNet of a 3d_fullres plan with ``stages`` resolution stages."""
  from flax import nnx

  from scribblejax.convert.nnunet import PlainConvUNet

  features = [min(32 * 2**s, 320) for s in range(stages)]
  return PlainConvUNet(
    1,
    classes,
    3,
    stages,
    features,
    3,
    [1] + [2] * (stages - 1),
    2,
    2,
    conv_bias=True,
    norm={"kind": "instance", "eps": 1e-5, "affine": True},
    nonlin={"kind": "leaky_relu"},
    rngs=nnx.Rngs(seed),
  )


def measure(
  net,
  patch: int,
  chunk: int | None,
  layers: int,
  mirror: bool,
  driver: str,
  steps: int = 0,
  repeats: int = 3,
  variant: str = "patch_blend",
) -> dict:
  """One record: the refinement's compiled memory for a 2x2x2 block of marked patches, blended over
  their dense region (``patch_blend``) or at the marks only (``marked_patches``, what ``refine`` runs)."""
  import jax
  import jax.numpy as jnp

  import scribblejax as sj
  from scribblejax.pipeline.sliding_window import MarkedPatches, Mirrored, PatchBlend, marked_patches

  size = patch + patch // 2
  starts = list(itertools.product((0, patch // 2), repeat=3))
  model = Mirrored(net, (0, 1, 2), (patch,) * 3 + (1,)) if mirror else net
  image = np.zeros((size, size, size, 1), np.float32)
  marks = np.full((size,) * 3, -1, np.int32)
  marks[(size // 2,) * 3] = 1
  if variant == "marked_patches":
    image, marks, kwargs = marked_patches(image, marks, (patch,) * 3)
    assert len(kwargs.pop("starts")) == len(starts)
    blend = MarkedPatches(model, (patch,) * 3, 1, chunk=chunk, **kwargs)
  else:
    blend = PatchBlend(model, starts, (patch,) * 3, 1, chunk=chunk)
  example = jax.ShapeDtypeStruct((1, *image.shape), jnp.float32)
  split = sj.split_params(blend, sj.last_layers(layers), example=example)
  config = sj.RefineConfig.paper(driver=driver, max_steps=max(steps, 1), early_stop=False)
  start = time.perf_counter()
  memory = sj.refinement.memory_analysis(split, image, marks, config)
  record = {
    "variant": variant,
    "dims": 3,
    "patch": patch,
    "patches": len(starts),
    "passes": 8 if mirror else 1,
    "chunk": blend.chunk,
    "layers": layers,
    "driver": memory["driver"],
    "peak_bytes": memory["peak_bytes"],
    "programs": memory["programs"],
    "compile_s": time.perf_counter() - start,
  }
  if steps:
    times = []
    for _ in range(repeats + 1):
      start = time.perf_counter()
      jax.block_until_ready(sj.refine(split, image, marks, config).logits)
      times.append(time.perf_counter() - start)
    median = float(np.median(times[1:]))
    record.update(steps=steps, ms_per_step=1000 * median / steps, run_compile_s=times[0] - median)
  return record


def stamp(record: dict) -> dict:
  """``record`` with the device's name and the versions."""
  import jax

  import scribblejax as sj
  from scribblejax.research.evaluate import device_name

  record.update(device=device_name(), versions={"jax": jax.__version__, "scribblejax": sj.__version__})
  return record


def write_records(records: list[dict], table: str, out: str | None) -> None:
  """Prints the table, and writes the records as JSON to ``out`` and the table beside it (``.md``), atomically."""
  from scribblejax.research.evaluate import write_json, write_text

  print(table)
  if out:
    write_json(out, records)
    write_text(Path(out).with_suffix(".md"), table + "\n")


def markdown(records: list[dict]) -> str:
  rows = [
    "| device | variant | patch | patches x passes | per call | peak MiB | ms per step |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in records:
    per_call = r["patches"] if r["chunk"] is None else r["chunk"]
    step = f"{r['ms_per_step']:.0f}" if "ms_per_step" in r else "-"
    rows.append(
      f"| {r['device']} | {r['variant']} | {r['patch']}^3 | {r['patches']} x {r['passes']} | {per_call} | "
      f"{r['peak_bytes'] / 2**20:.0f} | {step} |"
    )
  return "\n".join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--patch", type=int, default=64, help="patch edge (default 64)")
  parser.add_argument("--stages", type=int, default=5, help="U-Net stages (default 5; nnU-Net uses 6 at 128^3)")
  parser.add_argument("--chunks", default="all,2,1", help="patches per network call to measure (default all,2,1)")
  parser.add_argument("--layers", type=int, default=3, help="tunable last layers (default 3)")
  parser.add_argument("--mirror", action="store_true", help="also measure with 8 mirrored passes per patch")
  parser.add_argument("--driver", default="auto", help="refinement driver (default auto)")
  parser.add_argument("--steps", type=int, default=0, help="also time a refinement of this many steps (default 0: no)")
  parser.add_argument("--repeats", type=int, default=3, help="timed refinements after the first (default 3)")
  parser.add_argument(
    "--variants",
    default="patch_blend",
    help="patch_blend (over the patches' dense region) and/or marked_patches (at the marks only, "
    "what refine runs), comma-separated (default patch_blend)",
  )
  parser.add_argument("--out", help="JSON file of the records (written atomically)")
  args = parser.parse_args(argv)
  net = nnunet_fullres(args.stages)
  records = []
  for variant, mirror, text in itertools.product(
    args.variants.split(","), (False, True) if args.mirror else (False,), args.chunks.split(",")
  ):
    chunk = None if text.strip() == "all" else int(text)
    record = measure(
      net, args.patch, chunk, args.layers, mirror, args.driver, args.steps, args.repeats, variant.strip()
    )
    records.append(stamp({**record, "stages": args.stages}))
    print(json.dumps({k: v for k, v in record.items() if k != "programs"}), flush=True)
  write_records(records, markdown(records), args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
