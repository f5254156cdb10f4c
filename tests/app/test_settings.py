"""The settings table: one name per setting, RefineConfig's defaults, model.json's stored defaults."""

import dataclasses

import pytest

from scribblejax.app import SETTINGS, TUNED, RefineSettings
from scribblejax.app.settings import REPORTED, reported_settings
from scribblejax.cli import build_parser
from scribblejax.cli.flags import REFINE_SETTINGS
from scribblejax.config import RefineConfig

CONFIG = {f.name: f.default for f in dataclasses.fields(RefineConfig)}
ROUND = {f.name: f.default for f in dataclasses.fields(RefineSettings)}


def test_every_setting_is_a_config_field_or_a_rounds_knob_and_every_knob_has_one():
  assert set(SETTINGS) <= set(CONFIG) | set(ROUND)
  assert set(ROUND) - {"new_classes"} == set(SETTINGS)  # --new-class is read with the marks files
  assert set(TUNED) == {
    "max_steps",
    "learning_rate",
    "momentum",
    "prox_weight",
    "keep_weight",
    "optimizer",
    "progressive_merge",
  }
  flags = [s.flag for s in SETTINGS.values()] + [a for s in SETTINGS.values() for a in s.aliases]
  assert len(flags) == len(set(flags))


def test_the_round_defaults_are_refineconfigs():
  for name, setting in SETTINGS.items():
    if name in CONFIG and not setting.stored:
      assert ROUND[name] == CONFIG[name], name


@pytest.mark.parametrize("command", ["refine", "evaluate"])
def test_the_flags_come_from_the_table_and_the_old_names_still_work(command, capsys):
  parser = build_parser()
  args = parser.parse_args([command, "--lr", "0.5", "--alpha", "2"])
  assert args.learning_rate == 0.5 and args.prox_weight == 2.0
  args = parser.parse_args([command, "--learning-rate", "0.25", "--prox-weight", "3", "--steps", "7"])
  assert (args.learning_rate, args.prox_weight, args.max_steps) == (0.25, 3.0, 7)
  with pytest.raises(SystemExit):
    parser.parse_args([command, "--help"])
  text = capsys.readouterr().out
  assert "--learning-rate" in text and "--prox-weight" in text
  assert "--lr " not in text and "--alpha" not in text  # one documented name per setting


def test_refine_defaults_are_none_for_stored_settings_and_refineconfigs_otherwise():
  args = build_parser().parse_args(["refine"])
  for name in REFINE_SETTINGS:
    expected = None if SETTINGS[name].stored else ROUND[name]
    assert getattr(args, name) == expected, name


def test_stored_defaults_are_read_for_the_tuned_fields_and_the_flags_win():
  metadata = {"refine": {"max_steps": 30, "keep_weight": 0.5, "layers": 2, "region_growing": 0.1}}
  layers, config, grow = RefineSettings().resolve(metadata)
  assert (layers, config.max_steps, config.keep_weight, grow) == (2, 30, 0.5, 0.1)
  layers, config, grow = RefineSettings(max_steps=9, layers=4).resolve(metadata)
  assert (layers, config.max_steps) == (4, 9)
  layers, config, grow = RefineSettings(preset="paper").resolve(metadata)  # the paper ignores them
  assert config == RefineConfig.paper() and layers is None and grow is None


def test_the_reports_settings_keep_their_keys_and_order():
  layers, config, grow = RefineSettings(optimizer="sgd").resolve({})
  reported = reported_settings(RefineSettings(optimizer="sgd"), 5, config, grow)
  assert tuple(reported) == REPORTED
  assert reported["optimizer"] == "sgd" and reported["learning_rate"] == 0.01 and reported["layers"] == 5
