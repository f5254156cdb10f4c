"""The speed benchmark: a CI-sized run, its records, and the PyTorch reference's equivalence."""

import gzip
import json

import jax.numpy as jnp
import numpy as np
import pytest

import scribblejax as sj
from benchmarks import speed, torch_reference

FIELDS = (
  "device",
  "variant",
  "dims",
  "size",
  "batch",
  "steps",
  "ms_per_interaction",
  "ms_per_step",
  "images_per_s",
  "compile_s",
  "versions",
  "settings",
)


def test_a_quick_run_never_replaces_the_committed_full_results(tmp_path, monkeypatch):
  monkeypatch.setattr(speed, "RESULTS_DIR", tmp_path)
  assert speed.main(["--quick", "--cases", "2d32", "--variants", "scribblejax", "--batches", "1", "--no-check"]) == 0
  assert [p.name for p in sorted(tmp_path.glob("*.json"))] == [f"speed_{speed.device_name().lower()}_quick.json"]


def test_quick_benchmark_writes_records_and_table(tmp_path, capsys):
  out = tmp_path / "quick.json"
  variants = "scribblejax,torch_eager"
  assert speed.main(["--quick", "--cases", "2d32", "--variants", variants, "--batches", "1,2", "--out", str(out)]) == 0
  records = json.loads(out.read_text())
  by_variant = {}
  for r in records:
    assert all(f in r for f in FIELDS), sorted(r)
    by_variant.setdefault(r["variant"], []).append(r)
  jax_runs = by_variant["scribblejax"]
  assert sorted(r["batch"] for r in jax_runs) == [1, 2]
  for r in jax_runs:
    assert r["steps"] == 2 and r["ms_per_step"] > 0 and r["images_per_s"] > 0
    assert r["retraced"] is False  # new marks every interaction, nothing compiled again
    assert r["settings"]["channels"] == [4, 8] and r["versions"]["jax"]
  if torch_reference.torch_available():
    check = by_variant["check_torch_vs_scribblejax"][0]
    assert check["passed"] is True and "error" not in check
    assert check["max_abs_logit_diff"] <= check["logit_tolerance"] == speed.CHECK_TOLERANCE
    assert by_variant["torch_eager"][0]["steps"] == 2
  table = out.with_suffix(".md").read_text()
  assert "| device | variant |" in table and table.count("\n| ") >= len(records)
  assert "wrote" in capsys.readouterr().out


def test_a_torch_mismatch_fails_the_check_and_the_run(tmp_path, monkeypatch, capsys):
  pytest.importorskip("torch")
  out = tmp_path / "mismatch.json"
  # logits 2e-3 apart: within check_same's allclose (rtol 1e-3) on large logits, over the tolerance
  monkeypatch.setattr(torch_reference, "check_same", lambda *args, **kwargs: 2 * speed.CHECK_TOLERANCE)
  assert (
    speed.main(["--quick", "--cases", "2d32", "--variants", "scribblejax", "--batches", "1", "--out", str(out)]) == 1
  )
  (check,) = [r for r in json.loads(out.read_text()) if r["variant"] == "check_torch_vs_scribblejax"]
  assert check["passed"] is False and "logits differ by 0.002" in check["error"]
  assert "failed: torch and scribblejax logits differ" in out.with_suffix(".md").read_text()
  assert "measurements failed" in capsys.readouterr().err
  assert speed.check_outcome(float("nan"))["passed"] is False  # NaN logits never pass


def test_bad_arguments_fail_with_one_line(capsys):
  assert speed.main(["--quick", "--cases", "2d7"]) == 1
  assert "unknown case" in capsys.readouterr().err
  assert speed.main(["--quick", "--batches", "0"]) == 1
  assert "--batches" in capsys.readouterr().err
  for bad, message in (
    (["--channels", "a,b"], "comma-separated integers"),
    (["--channels", "0,8"], "positive"),
    (["--channels", "4"], "at least two"),
    (["--batch-steps", "-1"], "--batch-steps"),
  ):
    assert speed.main(["--quick", *bad]) == 1  # was: tracebacks, or every measurement failing
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("dims, shape", [(2, (13, 18)), (3, (6, 9, 7))])
def test_torch_mirror_computes_the_flax_forward(dims, shape):
  torch = pytest.importorskip("torch")
  model = speed.random_unet(dims, (4, 8, 16), classes=3, seed=dims)
  net = torch_reference.build_torch_unet(model)
  image = np.random.default_rng(0).normal(size=(1, *shape, 1)).astype(np.float32)
  ours = np.asarray(model(jnp.asarray(image)))
  with torch.no_grad():
    theirs = net(torch.from_numpy(np.moveaxis(image, -1, 1).copy())).numpy()
  np.testing.assert_allclose(np.moveaxis(theirs, 1, -1), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_precision_and_memory_variants(tmp_path):
  out = tmp_path / "mem.json"
  assert (
    speed.main(
      [
        "--quick",
        "--cases",
        "2d32",
        "--variants",
        "scribblejax,scribblejax_bf16,scribblejax_remat,scribblejax_xla",
        "--batches",
        "1",
        "--no-check",
        "--memory",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  records = {r["variant"]: r for r in json.loads(out.read_text())}
  assert records["scribblejax_bf16"]["compute_dtype"] == "bfloat16" and records["scribblejax_remat"]["remat"]
  assert records["scribblejax_xla"]["conv_backend"] == "xla"
  assert records["scribblejax"]["conv_backend"] == sj.kernels.resolve_conv_backend("auto")
  for r in records.values():
    assert r["steps"] == 2 and r["peak_bytes"] == r["memory"]["peak_bytes"] > 0
    assert set(r["memory"]["programs"]) >= {"chunk"} or set(r["memory"]["programs"]) == {"loop"}
  assert "peak MiB" in out.with_suffix(".md").read_text()


def test_probe_sums_the_device_events_of_a_trace(tmp_path):
  from benchmarks import gpu_probe

  events = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "X", "pid": 1, "name": "conv", "ts": 0, "dur": 30},
    {"ph": "X", "pid": 1, "name": "conv", "ts": 40, "dur": 30},
    {"ph": "X", "pid": 1, "name": "fusion", "ts": 80, "dur": 20},
    {"ph": "X", "pid": 2, "name": "host work", "ts": 0, "dur": 500},
  ]
  with gzip.open(tmp_path / "run.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  prof = gpu_probe._kernel_profile(tmp_path, calls=1, steps=2)
  assert prof["events_per_step"] == 1.5 and prof["busy_ms_per_step"] == 0.04 and prof["span_ms"] == 0.1
  assert prof["top"][0] == {"name": "conv", "count_per_step": 1.0, "us_per_step": 30.0}
  assert [t["name"] for t in prof["top"]] == ["conv", "fusion"]  # the host's events are not counted
  assert "error" in gpu_probe._kernel_profile(tmp_path / "missing", calls=1, steps=1)


def test_probe_summary_classes_kernels_and_bounds_the_matmul_time(tmp_path, capsys):
  from benchmarks import gpu_probe

  top = [
    {"name": "sm90_xmma_wgrad_implicit_gemm_tf32", "count_per_step": 2, "us_per_step": 40.0},
    {"name": "sm90_xmma_fprop_implicit_gemm_tf32", "count_per_step": 1, "us_per_step": 15.0},
    {"name": "sm90_xmma_dgrad_implicit_gemm_tf32", "count_per_step": 1, "us_per_step": 10.0},
    {"name": "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm>", "count_per_step": 1, "us_per_step": 4.0},
    {"name": "gemm_fusion_dot_3", "count_per_step": 1, "us_per_step": 1.0},
    {"name": "void cudnn::engines_precompiled::nchwToNhwcKernel<float>", "count_per_step": 2, "us_per_step": 7.0},
    {"name": "input_reduce_fusion_7", "count_per_step": 9, "us_per_step": 23.0},
  ]
  records = [
    {
      "label": "a",
      "case": "2d64",
      "batch": 2,
      "scheme": "matmul",
      "dtype": "float32",
      "steps": 10,
      "median_ms": 3.0,
      "profile": {"busy_ms_per_step": 0.1, "top": top},
    },
    {"label": "untraced", "case": "2d64", "batch": 1, "steps": 10, "median_ms": 1.0},
    {"label": "failed", "case": "2d64", "batch": 1, "steps": 10, "profile": {"error": "no trace"}},
  ]
  path = tmp_path / "probe.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  (row,) = gpu_probe.summarise(path)
  assert row["classes_us_per_step"] == {
    "conv_weight_grad": 40.0,
    "conv_input_grad": 10.0,
    "conv_forward": 15.0,
    "gemm": 5.0,
    "cudnn_layout": 7.0,
    "cudnn_other": 0.0,
    "other": 23.0,
  }
  assert row["matmul_floor_ms"] == 1.4 and row["busy_us_per_step"] == 100.0  # 70 us x 10 steps x 2 images
  gpu_probe.main(["--summarise", str(path)])
  assert json.loads(capsys.readouterr().out) == row
  with pytest.raises(SystemExit):
    gpu_probe.main(["--label", "x"])  # no --out, no --summarise


@pytest.mark.slow
def test_probe_times_and_profiles_one_configuration(tmp_path, monkeypatch):
  from benchmarks import gpu_probe

  monkeypatch.setenv("PROBE_DEVICE_PROCESS", "CPU")  # no GPU here: profile the host's events
  gpu_probe.main(["--out", str(tmp_path), "--label", "t", "--cases", "2d32", "--repeats", "1", "--trace"])
  (rec,) = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
  assert rec["label"] == "t" and rec["case"] == "2d32" and "error" not in rec
  assert rec["median_ms"] > 0 and rec["ms_per_step"] == round(rec["median_ms"] / rec["steps"], 4)
  assert rec["profile"]["events_per_step"] > 0, rec["profile"]


@pytest.mark.slow
def test_final_step_ab_times_both_backward_modes(tmp_path):
  from benchmarks import final_step_ab

  rec = final_step_ab.main(["--size", "32", "--repeats", "1", "--out", str(tmp_path / "ab.json")])
  assert json.loads((tmp_path / "ab.json").read_text())["case"] == "2d32"
  for key in ("ms_per_interaction_lazy_backward", "ms_per_interaction_eager_backward"):
    assert len(rec[key]["times"]) == 3 and rec[key]["median"] > 0
  assert rec["ms_tail_forward"] > 0 and all(0 <= s <= 30 for s in rec["steps_taken"])


@pytest.mark.slow
def test_patch_memory_measures_less_memory_one_patch_per_call(tmp_path, capsys):
  from benchmarks import patch_memory

  out = tmp_path / "pm.json"
  # the loop refine runs (PatchBlend's batches are measured by test_patch_blend_in_batches_...)
  assert (
    patch_memory.main(
      [
        "--patch",
        "8",
        "--stages",
        "2",
        "--chunks",
        "all,1",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--variants",
        "marked_patches",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  records = json.loads(out.read_text())
  assert [(r["variant"], r["chunk"]) for r in records] == [("marked_patches", None), ("marked_patches", 1)]
  assert all(r["patches"] == 8 and r["passes"] == 1 for r in records)
  assert records[1]["peak_bytes"] < records[0]["peak_bytes"]
  assert all(r["device"] and r["ms_per_step"] > 0 and r["programs"] for r in records)
  assert "| cpu | marked_patches | 8^3 | 8 x 1 | 1 |" in capsys.readouterr().out
  assert "| cpu | marked_patches | 8^3 | 8 x 1 | 1 |" in out.with_suffix(".md").read_text()


def test_sliding_window_benchmark_times_both_variants_on_the_same_logits(tmp_path, capsys):
  from benchmarks import sliding_window

  out = tmp_path / "sw.json"
  assert (
    sliding_window.main(
      ["--volume", "12", "--patch", "8", "--stages", "2", "--layers", "2", "--repeats", "1", "--out", str(out)]
    )
    == 0
  )
  records = json.loads(out.read_text())
  assert [r["variant"] for r in records] == ["two_passes", "joint_pass"]
  assert all(r["patches"] == 8 and r["seconds"] > 0 and r["device"] for r in records)
  assert records[0]["max_abs_diff"] < 1e-4
  assert "| cpu | 12^3 | 8^3 | 8 | 2 | joint_pass |" in out.with_suffix(".md").read_text()


def test_interleaved_timing_rotates_the_order_and_keeps_a_failing_contestant_apart():
  calls = []

  def contestant(name, fail_at=None):
    def call(i):
      if i == fail_at:
        raise RuntimeError(f"{name} failed")
      calls.append((name, i))
      return name

    return call

  timings = speed.time_interleaved([contestant("a"), contestant("b"), contestant("c", fail_at=2)], repeats=3)
  assert calls == [
    ("a", 0),
    ("b", 0),
    ("c", 0),
    ("a", 1),
    ("b", 1),
    ("c", 1),
    ("b", 2),
    ("a", 2),
    ("a", 3),
    ("b", 3),
  ]  # rounds: a b c, b c a, c a b (c dropped)
  assert [len(t.times_s) for t in timings[:2]] == [3, 3] and timings[0].last == "a"
  assert isinstance(timings[2], RuntimeError)

  def cut_short(i):  # a time limit's SIGINT in round 2
    if i == 2:
      raise KeyboardInterrupt
    return i

  with pytest.raises(speed.Interrupted) as stop:
    speed.time_interleaved([contestant("a"), cut_short, contestant("c")], repeats=3)
  a, cut, c = stop.value.partial  # what the ended rounds measured
  assert [len(t.times_s) for t in (a, cut, c)] == [1, 1, 1]  # round 2 began with the cut one


def test_ratios_are_against_the_strongest_torch_variant_of_the_same_precision_and_stop_rule():
  def rec(variant, ms, **kw):
    return {"variant": variant, "dims": 2, "size": 64, "batch": 1, "steps": 10, "ms_per_interaction": ms, **kw}

  records = [
    rec("scribblejax", 10.0, compute_dtype="float32"),
    rec("scribblejax_bf16", 5.0, compute_dtype="bfloat16"),
    rec("scribblejax_early_stop", 4.0, compute_dtype="float32"),
    rec("torch_eager", 60.0),
    rec("torch_cached", 30.0),
    rec("torch_compiled", 20.0),
    rec("torch_cached_bf16", 15.0, autocast_bf16=True),
    rec("torch_cached_early_stop", 8.0),
    rec("check_torch_cached_vs_scribblejax", 1.0),
    rec("scribblejax_trunk_reused", 1.0, compute_dtype="float32"),
  ]
  speed.add_ratios(records)
  by = {r["variant"]: r for r in records}
  assert (
    by["scribblejax"]["strongest_torch"] == "torch_compiled" and by["scribblejax"]["speedup_vs_strongest_torch"] == 2
  )
  assert (
    by["scribblejax_bf16"]["strongest_torch"] == "torch_cached_bf16"
    and by["scribblejax_bf16"]["speedup_vs_strongest_torch"] == 3
  )
  assert by["scribblejax_early_stop"]["strongest_torch"] == "torch_cached_early_stop"
  assert by["torch_eager"]["speedup_vs_strongest_torch"] == round(20 / 60, 3)
  assert "strongest_torch" not in by["check_torch_cached_vs_scribblejax"]
  assert "strongest_torch" not in by["scribblejax_trunk_reused"]  # not one interaction from W


@pytest.mark.slow
def test_peer_variants_run_in_turns_with_checks_and_unavailable_records(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "peer.json"
  variants = "scribblejax,scribblejax_bf16,torch_cached,torch_cached_bf16,torch_cuda_graphs,torch_cached_early_stop"
  assert (
    speed.main(
      [
        "--quick",
        "--cases",
        "2d32",
        "--variants",
        variants,
        "--batches",
        "1,2",
        "--repeats",
        "2",
        "--notes",
        "test run",
        "--out",
        str(out),
      ]
    )
    == 0
  )  # unavailable is no failure
  records = json.loads(out.read_text())
  by = {(r["variant"], r["batch"]): r for r in records}
  for name in ("check_torch_cached_vs_scribblejax", "check_torch_cached_bf16_vs_scribblejax"):
    assert by[(name, 1)]["passed"], by[(name, 1)]
  cuda = "check_torch_cuda_graphs_vs_scribblejax"
  if speed.torch_device() == "cpu":
    assert "CUDA" in by[(cuda, 1)]["unavailable"] and "CUDA" in by[("torch_cuda_graphs", 1)]["unavailable"]
  ours = by[("scribblejax", 1)]
  assert ours["order"] == "interleaved" and len(ours["times_s"]) == 2 and ours["retraced"] is False
  assert ours["strongest_torch"] in ("torch_cached", "torch_cuda_graphs")
  assert by[("scribblejax_bf16", 1)]["strongest_torch"] in ("torch_cached_bf16", "torch_cuda_graphs_bf16")
  assert by[("torch_cached_early_stop", 1)]["steps"] <= 5
  assert ("torch_cached_bf16", 2) not in by and ("torch_cached", 2) in by  # a batch: float32, fixed steps
  for r in records:
    assert r["notes"] == "test run" and r["date"] and "--notes" in r["command"] and r["versions"]
  assert "vs strongest torch" in out.with_suffix(".md").read_text()
