"""The correction benchmark: its verdicts, head to head, --set, and its wrapper for slices stored as volumes."""

import json

import numpy as np
import pytest

from benchmarks.correction.__main__ import (
  NO_MERGE,
  OURS,
  TAKE_BEST,
  head_to_head,
  judged,
  make_method,
  settings,
  squeezed,
  summary_table,
  verdicts,
)
from scribblejax.research.baselines import Method


def _run(method, dice, situation="in-domain"):
  return {
    "case": "c",
    "user": "scribble",
    "method": method,
    "dice_per_interaction": dice,
    "situation": situation,
    "split": "tuning",
    "rounds_unsatisfied": 0,
    "stop_reason": None,
  }


def test_verdicts_compare_the_defaults_with_the_network_and_the_best_peer():
  ok = verdicts([_run(OURS, [0.8, 0.85, 0.9]), _run("graph_cut", [0.8, 0.855, 0.88]), _run("paper", [0.8, 0.5, 0.9])])[
    0
  ]
  assert ok["not_below_network"] and ok["first_drop_at_most_0.01"] and ok["within_0.01_of_best_peer"]
  assert abs(ok["worst_gap_to_best_peer"] + 0.005) < 1e-9
  assert ok["final_at_least_0.85"]
  bad = verdicts([_run(OURS, [0.8, 0.78, 0.84]), _run("graph_cut", [0.8, 0.8, 0.86])])[0]
  assert not bad["not_below_network"] and not bad["first_drop_at_most_0.01"]
  assert not bad["within_0.01_of_best_peer"] and not bad["final_at_least_0.85"]
  assert "final_at_least_0.85" not in verdicts([_run(OURS, [0.1, 0.2], "new class")])[0]


def test_head_to_head_compares_the_defaults_with_each_peer_alone():
  runs = [
    _run(OURS, [0.5, 0.7, 0.8]),
    _run("paper", [0.5, 0.3, 0.9]),  # far below at k=1, above at k=2: neither holds against the other
    _run("head", [0.5, 0.695, 0.75]),  # within 0.01 of the defaults at k=1 only
  ]
  rows = {r["method"]: r for r in head_to_head(runs)}
  assert (rows["paper"]["ours_holds"], rows["paper"]["peer_holds"], rows["paper"]["ours_higher_auc"]) == (0, 0, 1)
  assert (rows["head"]["ours_holds"], rows["head"]["peer_holds"], rows["head"]["ours_higher_auc"]) == (1, 0, 1)
  # against the best of the others at each k, none holds: the paper is far below at k=1, the others at k=2
  assert [rows[m]["within_best_of_others"] for m in ("paper", "head", OURS)] == [0, 0, 0]
  assert rows["fbrs"]["runs"] == 0 and rows[OURS]["runs"] == 1
  alone = {r["method"]: r for r in head_to_head([_run(OURS, [0.5, 0.7]), _run("initial", [0.5, 0.5])])}
  assert alone[OURS]["within_best_of_others"] == 0 and alone["paper"]["runs"] == 0  # no peer ran: nothing to hold


@pytest.mark.parametrize("ablation", [NO_MERGE, TAKE_BEST])
def test_the_ablations_are_compared_but_are_no_peers(ablation):
  runs = [_run(OURS, [0.5, 0.7, 0.8]), _run("graph_cut", [0.5, 0.68, 0.79]), _run(ablation, [0.5, 0.9, 0.6])]
  rows = {r["method"]: r for r in head_to_head(runs)}
  assert (rows[ablation]["ours_holds"], rows[ablation]["peer_holds"], rows[ablation]["ours_higher_auc"]) == (0, 0, 0)
  # the defaults stay within 0.01 of the graph cut; the ablation, far above them at k=1, is not among the others
  assert rows[OURS]["within_best_of_others"] == 1
  assert verdicts(runs)[0]["within_0.01_of_best_peer"]


def test_the_ablation_runs_the_given_settings_without_the_merge(monkeypatch):
  import benchmarks.correction.__main__ as bench_main
  from scribblejax.config import RefineConfig
  from scribblejax.research import baselines as bl

  seen = {}
  monkeypatch.setattr(bl, "refine_method", lambda model, layers, config, **k: seen.setdefault(k["name"], config))
  candidate = RefineConfig(learning_rate=1e-2)
  bench_main.make_method(NO_MERGE, object(), config=candidate)
  bench_main.make_method(OURS, object(), config=candidate)
  assert seen[NO_MERGE] == RefineConfig(learning_rate=1e-2, progressive_merge=False)
  assert seen[OURS] == candidate


def test_the_summary_bolds_every_value_that_reads_as_the_best():
  runs = [_run("paper", [0.5, 0.8831]), _run(NO_MERGE, [0.5, 0.8834]), _run(OURS, [0.5, 0.843])]
  row = summary_table({"results": runs}).splitlines()[-1]
  assert row == "| c (0.500) | **0.883** | **0.883** | 0.843 |"


def test_set_reads_settings_of_the_refinement_and_names_bad_ones():
  got = settings(["merge_far=0.99", "optimizer=sgd", "early_stop=false", "max_steps=40"])
  assert got == {"merge_far": 0.99, "optimizer": "sgd", "early_stop": False, "max_steps": 40}
  with pytest.raises(ValueError, match="no such setting"):
    settings(["merge_fra=0.99"])
  with pytest.raises(ValueError, match="KEY=VALUE"):
    settings(["merge_far"])
  with pytest.raises(ValueError, match="merge_far is a probability"):
    settings(["merge_far=2"])


def test_a_case_hands_its_appended_classes_to_the_methods_with_the_merge(monkeypatch):
  import benchmarks.correction.__main__ as bench_main
  from benchmarks.correction.cases import BenchCase
  from scribblejax.research import baselines as bl

  seen = {}
  monkeypatch.setattr(
    bl, "refine_method", lambda model, layers, config, **k: seen.setdefault(k["name"], k["new_classes"])
  )
  monkeypatch.setattr(bl, "fbrs_method", lambda model, layers, **k: seen.setdefault("fbrs", k["new_classes"]))
  for name in (OURS, "paper", "head", "fbrs"):
    bench_main.make_method(name, object(), new_classes=(2,))
  assert seen == {OURS: (2,), "paper": (2,), "head": (2,), "fbrs": (2,)}

  class Stop(Exception):
    pass

  def make_method(name, model, layers=5, config=None, new_classes=(), judge=None):
    seen["run_one"] = new_classes
    raise Stop

  monkeypatch.setattr(bench_main, "make_method", make_method)
  bench = BenchCase(None, None, "new class", "held-out", "", new_classes=(2,))
  with pytest.raises(Stop):
    bench_main.run_one(bench, OURS, "scribble", 1, log=None)
  assert seen["run_one"] == (2,)


def test_a_slice_stored_as_a_volume_reaches_the_method_as_a_slice():
  seen = {}

  def init(image):
    seen["init"] = image.shape
    return np.zeros(image.shape[:-1], np.int32)

  def update(state, marks):
    seen["update"] = marks.shape
    return np.where(marks >= 0, marks, state)

  method = squeezed(Method("m", init, lambda s: s, update, lambda image: None, lambda s: {}), (2,))
  state = method.init(np.zeros((5, 6, 1, 1), np.float32))
  marks = np.full((5, 6, 1), -1, np.int32)
  marks[1, 2, 0] = 1
  state = method.update(state, marks)
  assert seen == {"init": (5, 6, 1), "update": (5, 6)}
  assert method.labels(state).shape == (5, 6, 1) and method.labels(state)[1, 2, 0] == 1


def test_take_best_takes_whichever_segmentation_the_judge_scores_higher():
  import dataclasses

  from flax import nnx

  import scribblejax as sj
  from scribblejax.research import metrics

  model = sj.UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(8, 16), rngs=nnx.Rngs(0))
  image = np.random.default_rng(0).normal(size=(16, 16, 1)).astype(np.float32)
  marks = np.full((16, 16), -1, np.int32)
  marks[3:6, 3:12] = 1 - np.asarray(sj.predict(sj.split_params(model, sj.last_layers(1)), image)).argmax(-1)[3:6, 3:12]
  one_step = dataclasses.replace(sj.RefineConfig(), max_steps=1)  # the merge writes marks the network has not learnt
  plain = make_method(OURS, model, 3, one_step)
  merged = plain.update(plain.init(image), marks)
  assert (merged.labels != merged.proposed).any()
  for truth, took in ((merged.proposed, True), (merged.labels, False)):
    judge = lambda labels, truth=truth: metrics.mean_foreground_dice(np.asarray(labels), truth, 2)
    method = make_method(TAKE_BEST, model, 3, one_step, judge=judge)
    state = method.update(method.init(image), marks)
    np.testing.assert_array_equal(method.labels(state), truth)
    assert method.info(state)["took_network"] is took
  level = make_method(TAKE_BEST, model, 3, one_step, judge=lambda labels: 0.5)  # a tie keeps the merge
  state = level.update(level.init(image), marks)
  np.testing.assert_array_equal(level.labels(state), merged.labels)
  assert level.info(state)["took_network"] is False
  with pytest.raises(ValueError, match="give judge"):
    make_method(TAKE_BEST, model, 3, one_step)


def test_the_claims_are_asked_of_take_best_beside_the_defaults_and_its_takes_are_counted():
  ours, best = _run(OURS, [0.6, 0.9, 0.95]), _run(TAKE_BEST, [0.6, 0.85, 0.9])  # the defaults are no peer
  best["method_info"] = [{"took_network": True}, {"took_network": False}]
  other = {**_run(TAKE_BEST, [0.3, 0.2, 0.4], "new class"), "case": "d", "method_info": [{"took_network": True}]}
  again = {**best, "case": "tissue2d_as_3d"}  # tissue2d_s140 again: its rounds are not counted twice
  runs = [ours, best, _run("paper", [0.6, 0.8, 0.82]), other, {**_run("paper", [0.3, 0.3, 0.3]), "case": "d"}, again]
  met = judged({"results": runs})["take_best"]
  assert met["claims_met"][TAKE_BEST] == {
    "not_below_network": [2, 3],
    "first_drop_at_most_0.01": [2, 3],
    "within_0.01_of_best_peer": [1, 2],  # the as-3-D copy has no peer run here
    "final_at_least_0.85": [2, 2],
  }
  assert met["claims_met"][OURS]["within_0.01_of_best_peer"] == [1, 1]
  assert met["took_network_rounds"] == [2, 3]
  plain = judged({"results": [ours, _run("paper", [0.6, 0.8, 0.82])], "take_best": met})
  assert "take_best" not in plain  # a rewrite without take_best runs drops the section


def test_the_lagged_rule_switches_only_when_the_networks_own_labels_had_most_new_marks_right():
  from benchmarks.correction.explore import takes_network

  new = np.array([[-1, 1, 1], [1, 1, -1]])
  shown = np.zeros((2, 3), int)  # wrong on all four new marks
  own = np.array([[0, 1, 1], [0, 0, 0]])  # right on two of four
  assert takes_network(shown, own, new)  # half, and more than shown
  assert not takes_network(shown, own, new, at_least=0.75)
  assert not takes_network(own, own, new)  # no more than shown
  assert not takes_network(shown, own, np.full((2, 3), -1))  # no new mark


def test_far_changes_count_only_regions_of_change_that_touch_no_mark():
  from benchmarks.correction.explore import far_changes

  before = np.zeros((5, 7), int)
  after = before.copy()
  after[0, 0:2] = 1  # touches the mark at (1, 1): near
  after[3:5, 4:7] = 1  # six pixels far from it
  marks = np.full((5, 7), -1)
  marks[1, 1] = 1
  truth = np.zeros((5, 7), int)
  truth[3, 4:7] = 1  # three of the far changes are right, three wrong
  assert far_changes(before, after, marks, truth) == (6, 0)
  truth[4, 4:7] = 1
  assert far_changes(before, after, marks, truth) == (6, 6)


def test_sureness_at_marks_averages_the_networks_top_probability_where_it_had_a_new_mark_wrong():
  from benchmarks.correction.explore import sureness_at_marks

  probabilities = np.array([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])  # W's labels: 0, 0, 1
  logits = np.log(probabilities)
  new = np.array([[1, 1, 1]])  # W had the first two wrong, the third right
  assert sureness_at_marks(logits, new) == pytest.approx(0.75)
  assert sureness_at_marks(logits, np.array([[0, -1, 1]])) is None  # every new mark right


def test_sureness_summary_splits_the_rounds_by_which_segmentation_was_clearly_better():
  from benchmarks.correction.explore import sureness_summary

  info = [
    {"w_sure": 0.9, "own_dice": 0.80, "merge_dice": 0.70},  # the network's own, clearly
    {"w_sure": 0.6, "own_dice": 0.70, "merge_dice": 0.80},  # the merge, clearly
    {"w_sure": 0.99, "own_dice": 0.705, "merge_dice": 0.70},  # neither
    {"w_sure": None, "own_dice": 0.9, "merge_dice": 0.5},  # W had every new mark right
  ]
  results = [{"method": "sureness", "method_info": info}, {"method": "far", "method_info": info}]
  assert sureness_summary(results) == {"own": [0.9], "merge": [0.6]}


def test_better_by_region_takes_the_networks_own_labels_only_in_the_regions_where_more_of_them_are_right():
  from benchmarks.correction.explore import better_by_region

  merged = np.zeros((4, 8), int)
  own = merged.copy()
  own[0, 0:3] = 1  # region A, three pixels: two right
  own[3, 5:8] = 1  # region B, three pixels: one right
  own[0, 6] = 1  # region C, one pixel: right
  own[1, 4:6] = 1  # region D, two pixels: one right, as many as the merge has (a tie keeps the merge)
  truth = np.zeros((4, 8), int)
  truth[1, 4] = 1
  truth[0, 0:2] = 1
  truth[3, 5] = 1
  truth[0, 6] = 1
  labels, taken, count = better_by_region(merged, own, truth)
  assert (taken, count) == (2, 4)
  expected = merged.copy()
  expected[0, 0:3] = 1
  expected[0, 6] = 1
  np.testing.assert_array_equal(labels, expected)
  labels, taken, _ = better_by_region(merged, own, truth, most=1)  # the larger of A and C
  assert taken == 1
  expected[0, 6] = 0
  np.testing.assert_array_equal(labels, expected)


def test_better_of_largest_judges_only_the_largest_regions_of_difference():
  from benchmarks.correction.explore import better_of_largest

  merged = np.zeros((4, 8), int)
  own = merged.copy()
  own[0, 0:3] = 1  # region A, three pixels: two right
  own[3, 5:8] = 1  # region B, three pixels: one right
  own[0, 6] = 1  # region C, one pixel: right, but the smallest
  own[1, 4:6] = 1  # region D, two pixels: a tie keeps the merge
  truth = np.zeros((4, 8), int)
  truth[1, 4] = truth[3, 5] = truth[0, 6] = 1
  truth[0, 0:2] = 1
  expected = merged.copy()
  expected[0, 0:3] = 1
  labels, taken = better_of_largest(merged, own, truth, 3)  # A, B and D looked at: A taken
  assert taken == 1
  np.testing.assert_array_equal(labels, expected)
  labels, taken = better_of_largest(merged, own, truth, 4)  # and C
  expected[0, 6] = 1
  assert taken == 2
  np.testing.assert_array_equal(labels, expected)
  labels, taken = better_of_largest(merged, merged.copy(), truth, 3)  # nothing differs: nothing taken
  assert taken == 0
  np.testing.assert_array_equal(labels, merged)


def test_sure_regions_takes_the_regions_the_refined_network_is_sure_of_on_average_but_not_kept_pixels():
  from benchmarks.correction.explore import sure_regions

  merged = np.zeros((3, 7), np.int32)
  own = merged.copy()
  own[0, 0:3] = 1  # region A: sureness 0.99, 0.99, 0.82 -> mean 0.933
  own[2, 4:7] = 2  # region B: mean 0.8
  sureness = np.full((3, 7), 0.8)
  sureness[0, 0:2] = 0.99
  sureness[0, 2] = 0.82
  kept = np.zeros((3, 7), bool)
  kept[0, 0] = True  # W was sure here (or it is marked)
  expected = merged.copy()
  expected[0, 1:3] = 1  # all of A but the kept pixel, none of B
  np.testing.assert_array_equal(sure_regions(merged, own, sureness, kept, 0.9), expected)
  np.testing.assert_array_equal(sure_regions(merged, own, sureness, kept, 0.95), merged)  # A's mean is below
  np.testing.assert_array_equal(sure_regions(merged, merged, sureness, kept, 0.9), merged)  # nothing differs


def test_region_gains_count_the_right_pixels_taking_each_region_would_gain_but_not_kept_ones():
  from benchmarks.correction.contrast import net_gains, region_gains

  image = np.zeros((20, 20, 1))
  image[:, 10:] = 1.0
  merged = np.zeros((20, 20), np.int32)
  merged[:, 12:] = 1
  own = np.zeros((20, 20), np.int32)
  own[:, 10:] = 1
  truth = own.copy()
  kept = np.zeros((20, 20), bool)
  kept[:5] = True  # five rows of the region may not change: 10 of its 40 pixels
  scores, gains = region_gains(image, merged, own, kept, truth)
  assert scores.tolist() == [1.0] and gains.tolist() == [30]
  assert net_gains(scores, gains, (0.5, 1.0)) == {"0.5": 30, "1": 0}  # above the threshold only
  _, gains = region_gains(image, merged, own, kept, merged)  # the merge was right there
  assert gains.tolist() == [-30]


def test_the_contrast_threshold_is_chosen_on_the_tuning_cases_only():
  from benchmarks.correction import contrast

  gains = lambda values: dict(zip((f"{t:g}" for t in contrast.THRESHOLDS), values, strict=True))
  n = len(contrast.THRESHOLDS)
  best_at = lambda i, loss_below=None: [
    (-5 if loss_below is not None and j < loss_below else 10 - abs(j - i)) for j in range(n)
  ]
  cases = {
    "a": {"split": "tuning", "gains": gains(best_at(2))},
    "b": {"split": "tuning", "gains": gains(best_at(3, loss_below=3))},
    "held": {"split": "held-out", "gains": gains(best_at(0))},  # would pull the choice down: ignored
  }
  assert contrast.choose(cases) == f"{contrast.THRESHOLDS[3]:g}"  # 2 loses on b; of the rest, 3 sums highest
  cases["b"]["gains"] = gains([-1] * n)
  assert contrast.choose(cases) is None


def _variant_run(variant, case, dice, split="tuning", situation="in-domain"):
  return {
    "variant": variant,
    "case": case,
    "user": "scribble",
    "split": split,
    "situation": situation,
    "dice_per_interaction": dice,
    "dice_auc": float(np.mean(dice)),
    "rounds_unsatisfied": 0,
    "stop_reason": None,
  }


def test_the_sensitivity_record_judges_each_variant_against_the_records_peers_and_the_defaults():
  from benchmarks.correction import sensitivity

  peer = {"method": "head", "case": "a", "user": "scribble", "dice_per_interaction": [0.5, 0.9, 0.9]}
  ours = {"method": OURS, "case": "a", "user": "scribble", "dice_per_interaction": [0.5, 0.85, 0.86]}
  runs = [_variant_run("defaults", "a", [0.5, 0.85, 0.86]), _variant_run("lower", "a", [0.5, 0.4, 0.95])]
  rows = sensitivity.summarise(runs, [peer, ours])
  assert rows["defaults"]["claims_met"]["within_0.01_of_best_peer"] == [0, 1]  # 0.85 < 0.9 - 0.01
  assert rows["defaults"]["claims_met"]["final_at_least_0.85"] == [1, 1]
  assert rows["lower"]["claims_met"]["not_below_network"] == [0, 1]  # 0.4 < 0.5
  assert rows["lower"]["claims_met"]["final_at_least_0.85"] == [1, 1]
  assert (rows["lower"]["lower_auc_than_defaults"], rows["lower"]["higher_auc_than_defaults"]) == (1, 0)
  assert sensitivity.reproduces(runs, [peer, ours]) == []
  assert sensitivity.reproduces([_variant_run("defaults", "a", [0.5, 0.85, 0.87])], [peer, ours]) == ["a/scribble"]


def test_reproduce_names_the_first_interaction_that_differs_and_the_largest_difference():
  from benchmarks.correction import reproduce

  assert reproduce.compare([0.5, 0.8, 0.9], [0.5, 0.8, 0.9]) == {"max_abs_diff": 0.0, "first_differing": None}
  differ = reproduce.compare([0.5, 0.8, 0.9], [0.5, 0.81, 0.85])
  assert differ["first_differing"] == 1 and abs(differ["max_abs_diff"] - 0.05) < 1e-12
  with pytest.raises(ValueError, match="3 Dice values"):
    reproduce.compare([0.5, 0.8, 0.9], [0.5, 0.8])
  undefined = reproduce.compare([None, 0.8, 0.9], [None, 0.8, None])  # no foreground anywhere: Dice undefined
  assert undefined == {"max_abs_diff": 0.0, "first_differing": 2}


def test_the_reproduce_record_counts_identical_runs_and_names_both_cpus(tmp_path):
  from benchmarks.correction import reproduce
  from benchmarks.correction.__main__ import write_record

  env = {"command": "c", "date": "d", "jax": "0.10.2", "cpu_model": "AMD EPYC", "cpu_features": ["avx2"]}
  env["cpu_count"] = 2
  run = {"case": "a", "user": "click", "method": OURS, "record_dice": [0.5, 0.6], "dice": [0.5, 0.6]}
  payload = {
    "record": "r.json",
    "record_environment": {"date": "d0", "jax": "0.10.2", "processor": "", "cpu_count": 2},
    "environment": env,
    "runs": [
      {**run, **reproduce.compare(run["record_dice"], run["dice"])},
      {**run, "user": "box", "dice": [0.5, 0.7], **reproduce.compare([0.5, 0.6], [0.5, 0.7])},
    ],
  }
  text = reproduce.markdown(payload)
  assert "**1 of 2 runs reproduce the record bit for bit**" in text
  assert "| a | box | scribblejax | 1 | 0.1000 | 0.500 0.600 | 0.500 0.700 |" in text
  assert "model and features not recorded" in text and "AMD EPYC (avx2), 2 cores" in text
  write_record(tmp_path / "new", "reproduce", payload, text)
  assert (tmp_path / "new" / "reproduce.md").read_text() == text
  assert json.loads((tmp_path / "new" / "reproduce.json").read_text())["runs"][1]["first_differing"] == 1
