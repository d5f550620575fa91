"""Config files, argument strings, overrides and validation errors."""
import os

import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import config_defaults
from diffusion_jax.train import loop

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "dit_image.py")


def test_parse_arg_types_and_flags():
  arg = config_lib.parse_arg("variant=S/2,smoke,steps=7", variant="tiny", smoke=False, steps=1)
  assert (arg.variant, arg.smoke, arg.steps) == ("S/2", True, 7)
  with pytest.raises(config_lib.ConfigError, match="unknown config argument 'bogus'"):
    config_lib.parse_arg("bogus=1", variant="tiny")


def test_load_and_override():
  config = config_lib.load_config(CONFIG + ":smoke")
  assert config.model.variant == "smoke"
  config_lib.apply_overrides(config, ["train.steps=100", "data.patch=(1,4,4)", "train.lr=1e-3",
                                      "model.learn_sigma=false", "diffusion.schedule=cosine"])
  assert config.train.steps == 100 and isinstance(config.train.steps, int)
  assert tuple(config.data.patch) == (1, 4, 4)
  assert config.train.lr == 1e-3 and config.model.learn_sigma is False
  assert config.diffusion.schedule == "cosine"


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "no config field 'train.stepz'"),
    ("trian.steps=3", "no config field 'trian'"),
    ("train.steps=many", "cannot read train.steps='many' as int"),
    ("train.steps", "needs the form"),
])
def test_bad_overrides(override, message):
  config = config_lib.load_config(CONFIG + ":smoke")
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.apply_overrides(config, [override])


def test_missing_file():
  with pytest.raises(config_lib.ConfigError, match="config file not found: nowhere.py"):
    config_lib.load_config("nowhere.py:smoke")


@pytest.mark.parametrize("override, message", [
    ("model.variant=Z/9", "unknown model.variant 'Z/9'"),
    ("data.image_size=15", r"does not divide data.image_size=15"),
    ("train.global_batch=6", "not divisible by the data-parallel size 8"),
    ("data.tokens_per_row=16", "smaller than one example"),
    ("data.patch=(1,4,4)", "disagrees with model.variant"),
    ("mesh.shape=(3,-1,1)", "8 devices do not divide by 3"),
])
def test_validation_errors(override, message):
  config = config_lib.load_config(CONFIG + ":smoke")
  config_lib.apply_overrides(config, [override])
  with pytest.raises(config_lib.ConfigError, match=message):
    loop.validate(config, num_devices=8)


def test_mesh_shape_resolution():
  assert config_lib.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert config_lib.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(config_lib.ConfigError, match="needs 4 devices, found 8"):
    config_lib.resolve_mesh_shape((2, 2, 1), 8)


def test_json_round_trip_keeps_values():
  config = config_lib.load_config(CONFIG + ":smoke")
  again = config_lib.from_json(config_lib.to_json(config))
  assert config_lib.to_json(again) == config_lib.to_json(config)
  assert config_lib.config_hash(again) == config_lib.config_hash(config)


@pytest.mark.parametrize("overrides, message", [
    (["data.image_size=0"], "data.fixed_size needs data.image_size >= 1"),
    (["data.fixed_size=False", "model.family=unet"], "model.family='unet' needs data.fixed_size=True"),
])
def test_fixed_size_is_an_explicit_field(overrides, message):
  """data.fixed_size, not the presence of data.image_size, says an image model has one size."""
  config = config_lib.load_config(CONFIG + ":smoke")
  config_lib.apply_overrides(config, overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    loop.validate(config, num_devices=8)


def test_shipped_recipes_load_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_lib.load_config("configs/dit_image.py:smoke")
  assert config_lib.to_json(config) == config_lib.to_json(config_lib.load_config(CONFIG + ":smoke"))
  with pytest.raises(config_lib.ConfigError, match="no recipe 'nowhere.py'"):
    config_lib.load_config("configs/nowhere.py")


def test_recipes_share_one_rule_table():
  """Each recipe's logical-axis rules are config_defaults.LOGICAL_RULES (the VAE keeps its channels whole)."""
  for name, arg in [("dit_image.py", "smoke"), ("video_dit.py", "smoke"), ("ddpm_digits.py", "smoke"),
                    ("classifier_digits.py", "smoke")]:
    rules = tuple(config_lib.load_config(config_lib.recipe_path(name) + ":" + arg).mesh.rules)
    assert rules == config_defaults.LOGICAL_RULES, name
  vae_rules = dict(config_lib.load_config(config_lib.recipe_path("vae_video.py") + ":smoke").mesh.rules)
  assert vae_rules["channels"] is None and vae_rules["batch"] == ("data", "fsdp")
