"""Config files, their argument strings and command-line overrides (validation: train.loop.validate).

A config is a Python file with `get_config(arg)` returning an
`ml_collections.ConfigDict` (big_vision's convention). It is named on the
command line as `path/to/config.py:key=value,flag`; single fields are
overridden with `--config.section.field=value`. Every mistake found here is a
`ConfigError` with one line that names the problem, raised before anything
compiles.
"""
import ast
import hashlib
import importlib.util
import json
import os

import ml_collections


class ConfigError(ValueError):
  """A config that cannot run; the message names the offending field."""


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses 'variant=S/2,smoke' into a ConfigDict, typed by `defaults`.

  A bare word sets a boolean default to True. Keys not in `defaults` are an
  error, so a typo in the argument string never passes silently.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
      result[key] = True
    else:
      result[key] = _convert(value, defaults[key], key)
  return result


def _convert(text: str, like, name: str):
  """Converts `text` to the type of the existing value `like`."""
  try:
    if isinstance(like, bool):
      if text.lower() in ("1", "true", "yes"):
        return True
      if text.lower() in ("0", "false", "no"):
        return False
      raise ValueError(text)
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
    if isinstance(like, ml_collections.ConfigDict):
      # A whole section as JSON, e.g. data.builder='{"folder": "/data/clips"}': replaced, not merged.
      value = json.loads(text)
      if not isinstance(value, dict):
        raise ValueError(text)
      return ml_collections.ConfigDict(value)
    if isinstance(like, (tuple, list)):
      # literal_eval parses literals only (numbers, strings, tuples): no code runs.
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return type(like)(value)
    if like is None:
      return ast.literal_eval(text) if text[:1] in "0123456789-([" else text
  except (ValueError, SyntaxError):  # json.JSONDecodeError is a ValueError
    raise ConfigError(f"cannot read {name}={text!r} as {type(like).__name__}") from None
  return text


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
RECIPES_DIRS = (
    os.path.join(_PACKAGE_DIR, "configs"),  # an installed package (setup.py maps configs/ there)
    os.path.join(os.path.dirname(_PACKAGE_DIR), "configs"),  # a source checkout
)


def recipe_path(name: str) -> str:
  """The path of a shipped recipe, e.g. recipe_path("video_dit.py"), installed or in a checkout."""
  for folder in RECIPES_DIRS:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise ConfigError(f"no recipe {name!r} in {' or '.join(RECIPES_DIRS)}")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' by running its get_config(arg).

  A path 'configs/NAME.py' that does not exist from here is the shipped recipe NAME.py, so the
  README's commands run from any directory.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path) and os.path.dirname(os.path.normpath(path)) == "configs":
    path = recipe_path(os.path.basename(path))
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location("diffusion_jax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function")
  config = module.get_config(arg)
  config.lock()  # from here on, assigning a field that does not exist is an error
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  """Applies ['train.steps=100', ...] in place; unknown fields are an error."""
  for item in overrides:
    name, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} needs the form --config.section.field=value")
    *parents, field = name.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"no config field {'.'.join(parents[:i + 1])!r} (in override {item!r})")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      raise ConfigError(f"no config field {name!r}; fields here: {sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []}")
    with node.unlocked():
      node[field] = _convert(text, node[field], name)


def resolve_mesh_shape(shape, num_devices: int) -> tuple:
  """Replaces the single -1 in a mesh shape by the rest of the devices."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh.shape {tuple(shape)} has more than one -1")
  known = 1
  for s in shape:
    if s != -1:
      known *= s
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"mesh.shape {tuple(shape)}: {num_devices} devices do not divide by {known}")
    shape[shape.index(-1)] = num_devices // known
  if _product(shape) != num_devices:
    raise ConfigError(f"mesh.shape {tuple(shape)} needs {_product(shape)} devices, found {num_devices}")
  return tuple(shape)


def _product(xs):
  out = 1
  for x in xs:
    out *= x
  return out


def config_hash(config: ml_collections.ConfigDict) -> str:
  return hashlib.sha256(to_json(config).encode()).hexdigest()[:16]


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a config saved by to_json (tuples come back as lists)."""
  return ml_collections.ConfigDict(json.loads(text))
