"""Sharded refinement over 4 (simulated) CPU devices equals the unsharded batch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    import scribblejax as sj
    from scribblejax.testing import random_unet
    from scribblejax.refinement import sharding
    assert jax.device_count() == 4, jax.devices()
    split = sj.split_params(random_unet(2, (4, 8), classes=3), sj.last_layers(3))
    rng = np.random.default_rng(0)
    for batch, driver in [(8, "loop"), (6, "loop")]:            # 6 is padded to 8: one sharded compile
      images = rng.normal(size=(batch, 16, 16)).astype(np.float32)
      marks = np.full((batch, 16, 16), -1, np.int32)
      for b in range(batch - 1):                       # the last image has no marks
        marks[b, rng.integers(0, 16, 6), rng.integers(0, 16, 6)] = rng.integers(0, 3, 6)
      config = sj.RefineConfig.paper(max_steps=15, learning_rate=0.05, prox_weight=0.01, driver=driver)
      unsharded = sj.refine_batch(split, images, marks, config)
      sharded = sharding.refine_sharded(split, images, marks, config)
      assert np.array_equal(np.asarray(sharded.num_steps), np.asarray(unsharded.num_steps))
      assert np.array_equal(np.asarray(sharded.satisfied), np.asarray(unsharded.satisfied))
      assert int(np.asarray(sharded.num_steps).max()) > 0 and int(sharded.num_steps[-1]) == 0
      np.testing.assert_allclose(np.asarray(sharded.logits), np.asarray(unsharded.logits), rtol=1e-4, atol=1e-4)
      if batch % 4 == 0:                               # no padding: the result stays spread over the devices
        assert len(sharded.logits.sharding.device_set) == 4
        assert sharded.logits.sharding.spec[0] == "batch"
    # keep_weight: each device computes its images' own initial labels for the keep term
    keep = sj.RefineConfig.paper(max_steps=5, learning_rate=0.05, prox_weight=0.01, keep_weight=1.0)
    unsharded, sharded = (f(split, images, marks, keep) for f in (sj.refine_batch, sharding.refine_sharded))
    np.testing.assert_allclose(np.asarray(sharded.loss_trace), np.asarray(unsharded.loss_trace), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sharded.logits), np.asarray(unsharded.logits), rtol=1e-4, atol=1e-4)
    try:
      sharding.refine_sharded(split, images, marks, config,
                              mesh=jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)))
      raise SystemExit("a mesh without a batch axis was accepted")
    except ValueError as err:
      assert "batch" in str(err)
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_sharded_equals_unsharded_on_four_cpu_devices(tmp_path):
  root = Path(__file__).resolve().parents[2]
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr


def test_batch_mesh_spans_every_device():
  jax = pytest.importorskip("jax")
  from scribblejax.refinement import sharding

  mesh = sharding.batch_mesh()
  assert mesh.axis_names == ("batch",) and mesh.size == jax.device_count()


HOST_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    process, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import scribblejax as sj
    from scribblejax.testing import random_unet
    from scribblejax.refinement import prepare_inputs
    from scribblejax.refinement.sharding import batch_mesh, refine_sharded
    split = sj.split_params(random_unet(2, (4, 8), classes=2), sj.last_layers(2))
    rng = np.random.default_rng(process)                   # each host has its own image and marks
    images = rng.normal(size=(1, 8, 8)).astype(np.float32)
    marks = np.full((1, 8, 8), -1, np.int32)
    marks[0, 1, 1], marks[0, 6, 6] = 0, 1
    mesh = batch_mesh()                                    # one device per host here
    spec = NamedSharding(mesh, P("batch"))
    local_images, local_marks = prepare_inputs(split, images, marks, batched=True)
    out = {}
    for driver in ("host", "loop"):                        # the docstring's procedure, with both drivers
      config = sj.RefineConfig.paper(max_steps=10, learning_rate=0.05, prox_weight=0.01, driver=driver)
      result = refine_sharded(split, jax.make_array_from_process_local_data(spec, np.asarray(local_images)),
                              jax.make_array_from_process_local_data(spec, np.asarray(local_marks)), config, mesh=mesh)
      mine = np.asarray(result.logits.addressable_shards[0].data)
      alone = sj.refine_batch(split, images, marks, config)
      out[driver] = float(np.abs(mine - np.asarray(alone.logits)).max())
    print("HOSTS_OK", json.dumps(out), flush=True)
""")


@pytest.mark.slow
def test_multi_host_procedure_of_the_docstring_with_two_processes(tmp_path):
  """Two processes (jax.distributed over gloo on the CPU), one device each: each host's images refined
  as a local refine_batch would; the host driver used to fail fetching other hosts' flags."""
  import socket

  root = Path(__file__).resolve().parents[2]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", HOST_SCRIPT, str(i), port],
      cwd=tmp_path,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=300)
      outputs.append((proc.returncode, stdout, stderr))
  finally:
    for proc in procs:
      proc.kill()
  for code, stdout, stderr in outputs:
    assert code == 0 and "HOSTS_OK" in stdout, stdout + stderr[-3000:]
    diffs = json.loads(stdout.split("HOSTS_OK", 1)[1])
    assert diffs["host"] < 1e-5 and diffs["loop"] < 1e-5, diffs
