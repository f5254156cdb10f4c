"""The settings table: one name per setting, RefineConfig's defaults, model.json's stored defaults."""

import argparse
import dataclasses

import pytest

from scribblejax.app import SETTINGS, TUNED, RefineSettings
from scribblejax.app.settings import DEFAULTS, FRONT_ENDS, REPORTED, reported_settings, settings_of
from scribblejax.cli import build_parser
from scribblejax.cli.flags import REFINE_SETTINGS
from scribblejax.config import PRESETS, RefineConfig
from scribblejax.research.simulate import ROBOT_USERS

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


def test_the_reports_settings_order_is_the_tables_and_unchanged():
  assert REPORTED == (
    "layers",
    "max_steps",
    "learning_rate",
    "momentum",
    "prox_weight",
    "region_growing",
    "keep_weight",
    "optimizer",
    "progressive_merge",
    "merge_contrast",
    "preset",
    "class_balance",
    "continue_weights",
    "check_every",
    "compute_dtype",
    "remat",
    "conv_backend",
  )


def test_refinesettings_is_generated_from_the_table():
  assert list(ROUND) == [*SETTINGS, "new_classes"]
  assert {name: ROUND[name] for name in SETTINGS} == DEFAULTS
  for name, setting in SETTINGS.items():
    assert setting.help in RefineSettings.__doc__, name
  assert hash(RefineSettings(max_steps=3)) == hash(RefineSettings(max_steps=3))  # frozen, hashable


def test_resolve_forwards_every_config_setting():
  given = {
    "driver": "host",
    "check_every": 4,
    "class_balance": True,
    "compute_dtype": "bfloat16",
    "remat": True,
    "merge_contrast": 0.5,
  }
  for preset in PRESETS:
    _, config, _ = RefineSettings(preset=preset, conv_backend="xla", **given).resolve({})
    assert {name: getattr(config, name) for name in given} == given and config.conv_backend == "xla", preset


def test_merge_contrast_flag_reaches_the_config():
  args = build_parser().parse_args(["refine", "--merge-contrast", "0.5"])
  assert args.merge_contrast == 0.5
  assert build_parser().parse_args(["refine"]).merge_contrast == RefineConfig().merge_contrast


@pytest.mark.parametrize("command", ["refine", "evaluate", "view", "demo"])
def test_each_command_offers_the_settings_whose_rows_name_it(command):
  subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  dests = [a.dest for a in subparsers.choices[command]._actions if a.dest in SETTINGS]
  assert list(dict.fromkeys(dests)) == list(settings_of(command))  # (aliases repeat a dest)
  for name in settings_of(command):
    assert any(SETTINGS[name].flag in a.option_strings for a in subparsers.choices[command]._actions), name


def test_the_rows_name_known_front_ends_and_view_sets_widget_fields():
  assert all(set(s.commands) <= set(FRONT_ENDS) for s in SETTINGS.values())
  assert set(settings_of("refine")) == set(SETTINGS)  # refine offers every setting
  assert set(settings_of("view")) <= set(settings_of("napari"))  # view fills the widget's fields


def test_demo_offers_the_robot_users():
  subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  (marks,) = [a for a in subparsers.choices["demo"]._actions if a.dest == "marks"]
  assert tuple(marks.choices) == ROBOT_USERS
