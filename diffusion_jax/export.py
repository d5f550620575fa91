"""Evaluation artifacts: what evaluation and sampling need from a run, and nothing else.

An export directory holds

  params/             the EMA params as an Orbax PyTree checkpoint (float32 or bfloat16)
  config.json         the run's full config (config.to_json)
  export.json         provenance: task, step, config hash, dataset, code version,
                      param count, dtype, created time, every file with its size;
                      the checkpoint's extras (a VAE's latent_stats) where saved
  params.safetensors  optional: the same params flat, keys "/"-joined ("blocks/attn/query/kernel")
  vae/                latent models only: the VAE the model decodes with, itself an export

It loads (load_export) on any device count, without the optimizer state and
without the training workdir; never through pickle. restore_ema_params reads
the config and EMA params alone of an export or of a training workdir: the one
way every trained model is loaded (inference.py). The export is written
into a temporary sibling directory and renamed into place when complete, so
a crash never leaves a directory that looks like a finished export; a
damaged one (missing or truncated file, a params tree that does not fit the
config's model) is refused with BadExport naming what is wrong.
"""
import dataclasses
import datetime
import importlib.metadata
import json
import os
import shutil
import subprocess
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from safetensors import numpy as safetensors_numpy

from diffusion_jax import checkpoint
from diffusion_jax import config as config_lib
from diffusion_jax import sharding
from diffusion_jax.config import ConfigError
from diffusion_jax.train import loop

FORMAT_VERSION = 1
INFO_FILE = "export.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
SAFETENSORS_FILE = "params.safetensors"
VAE_DIR = "vae"
DTYPES = ("float32", "bfloat16")


class BadExport(ValueError):
  """An export directory that is missing a part, is truncated, or does not fit its config."""


@dataclasses.dataclass
class Export:
  """A loaded export: its config, its (EMA) params and its export.json; `vae` for latent models."""

  path: str
  config: ml_collections.ConfigDict
  params: Any
  info: dict
  vae: "Export | None" = None


# --------------------------------------------------------------------------- helpers

def code_version() -> str:
  """`git describe --always --dirty` of the package's checkout, else the installed package version."""
  package_dir = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=package_dir,
                         capture_output=True, text=True, timeout=10, check=True)
    if out.stdout.strip():
      return "git:" + out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    return "package:" + importlib.metadata.version("diffusion_jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def flatten_params(params) -> dict[str, Any]:
  """{"a/b/kernel": leaf} of a nested params dict (the safetensors key convention here)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return flat


def _cast(params, dtype: str):
  """Floating leaves to `dtype`; integer leaves (if any) unchanged. ShapeDtypeStructs, or arrays,
  which are cast on the host (numpy) so no small device program compiles per leaf shape."""
  target = jnp.dtype(dtype)

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, target, sharding=x.sharding)
    return np.asarray(x).astype(target)

  return jax.tree_util.tree_map(cast, params)


def _restore_mesh(config):
  """The run's mesh on the devices present; a data-only mesh when its shape does not fit them."""
  try:
    return sharding.make_mesh(config.mesh)
  except ConfigError:
    return sharding.data_mesh(config.mesh)


def _restore_target(config, mesh, dtype=None):
  """Abstract params of the config's model (eval_shape of its init: no optimizer, nothing allocated),
  each carrying its sharding: whole on the first local device (mesh None) or split by the logical rules."""
  task = loop.TASKS[config.task]
  model = task.build_model(config)
  init = lambda rng: task.init_params(model, config, rng)
  rules = sharding.logical_rules(config.mesh)
  if mesh is None:
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, nn.meta.unbox(boxed))
  else:
    with sharding.activate(mesh, rules):
      boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.shardings_of(boxed, mesh, rules)
  abstract = nn.meta.unbox(boxed)
  if dtype is not None:
    abstract = _cast(abstract, dtype)
  return checkpoint.abstract_with_shardings(abstract, shardings)


def restore_ema_params(path: str, step: int | None = None, mesh_for=lambda config: None):
  """(config, step, EMA params) of a training workdir or an export: the one way a trained model is read.

  Only the EMA params are read. The target is the abstract params of the
  saved config's model alone; from a workdir, Orbax's partial restore
  (checkpoint.restore_ema_params) reads only the state's `ema_params`, never
  the optimizer's moments or the raw params. step: a workdir's checkpoint
  (default the newest); an export holds one. mesh_for(config): the mesh to
  split the params over by the config's logical rules, or None for every
  param whole on the first local device.
  """
  if _is_export(path):
    info = load_info(path)
    if step is not None and step != info["step"]:
      raise ValueError(f"{path} is an export of step {info['step']}, not of step {step}")
    config = _export_config(path, info)
    target = _restore_target(config, mesh_for(config), info["dtype"])
    return config, info["step"], _restore_export_params(path, target)
  try:
    manager = checkpoint.make_manager(path, keep=1, create=False)
  except FileNotFoundError:
    raise ValueError(f"{path} has no checkpoints/ directory: not a training workdir") from None
  try:
    steps = manager.all_steps()
    if not steps:
      raise ValueError(f"{path} holds no finished checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"{path} has no checkpoint of step {step}; it has steps {sorted(steps)}")
    config = checkpoint.saved_config(manager, step)
    params = checkpoint.restore_ema_params(manager, step, _restore_target(config, mesh_for(config)))
  finally:
    manager.close()
  return config, step, params


def saved_extras(workdir: str, step: int):
  """The JSON extras a task saved with the checkpoint (e.g. the VAE's latent_stats), or None."""
  manager = checkpoint.make_manager(workdir, keep=1, create=False)
  try:
    return checkpoint.saved_extras(manager, step)
  finally:
    manager.close()


def _files_with_sizes(root: str) -> dict[str, int]:
  files = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      files[os.path.relpath(path, root)] = os.path.getsize(path)
  return dict(sorted(files.items()))


def _write_json(path: str, value) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write("\n")


def _is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, INFO_FILE))


# --------------------------------------------------------------------------- export

def export(workdir: str, out_dir: str, *, step: int | None = None, dtype: str = "float32",
           safetensors: bool = False) -> str:
  """Writes the evaluation artifact of WORKDIR's checkpoint (newest, or `step`) to OUT_DIR.

  dtype: "float32" or "bfloat16" for the floating params. safetensors: also
  write params.safetensors. Latent models (config.latent.vae set: a VAE
  training workdir or a VAE export) bundle their VAE as OUT_DIR/vae, exported
  the same way (an export is copied as it is), and the exported config points
  latent.vae at "vae" (relative to the export); the text encoder is
  referenced (config.text.encoder_dir, recorded in export.json), not copied.
  Returns OUT_DIR. Refuses an OUT_DIR that exists and is not empty.
  Single-process: run it on one host (the params are gathered there).
  """
  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ValueError(f"{out_dir} exists and is not an empty directory; choose another export directory")
  if _is_export(workdir):  # its checkpoint extras are not there to carry over
    raise ValueError(f"{workdir} is an export, not a training workdir")
  config, step, params = restore_ema_params(workdir, step, mesh_for=_restore_mesh)
  training_config_hash = config_lib.config_hash(config)
  params = _cast(jax.device_get(params), dtype)  # numpy on the host

  staging = f"{out_dir}.partial-{os.getpid()}"
  if os.path.exists(staging):
    shutil.rmtree(staging)
  os.makedirs(staging)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, PARAMS_DIR), params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if safetensors:
      safetensors_numpy.save_file({k: np.asarray(v) for k, v in flatten_params(params).items()},
                                  os.path.join(staging, SAFETENSORS_FILE))

    exported_config = ml_collections.ConfigDict(config.to_dict())
    info = dict(
        format=FORMAT_VERSION,
        task=config.task,
        step=int(step),
        workdir=os.path.abspath(workdir),
        config_hash=training_config_hash,
        dataset=dict(name=config.data.name, split=config.data.split, eval_split=config.data.eval_split),
        code_version=code_version(),
        param_count=int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))),
        dtype=dtype,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    extras = saved_extras(workdir, step)
    if extras:
      info["extras"] = extras
      if "latent_stats" in extras:  # what inference.load_vae reads from an export
        info["latent_stats"] = {k: list(extras["latent_stats"][k]) for k in ("mean", "std")}
    latent = config.get("latent", None)
    if latent is not None and latent.get("vae", ""):
      info["vae"] = _bundle_vae(str(latent.vae), os.path.join(staging, VAE_DIR), dtype)
      exported_config.latent.vae = VAE_DIR
    text = config.get("text", None)
    if text is not None and text.get("encoder_dir", None) is not None:
      encoder_dir = str(text.encoder_dir)
      info["text_encoder"] = dict(
          name=str(text.get("encoder", "") or os.path.basename(os.path.normpath(encoder_dir)) or "default"),
          dir=encoder_dir)

    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      f.write(config_lib.to_json(exported_config))
    info["exported_config_hash"] = config_lib.config_hash(exported_config)
    info["files"] = _files_with_sizes(staging)
    _write_json(os.path.join(staging, INFO_FILE), info)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.rename(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_dir


def _bundle_vae(source: str, target: str, dtype: str) -> dict:
  """Exports (a workdir) or copies (an export) the VAE into `target`; returns its provenance."""
  if _is_export(source):
    load_info(source)  # refuse a damaged export before copying it
    shutil.copytree(source, target)
  elif os.path.isdir(os.path.join(source, "checkpoints")):
    export(source, target, dtype=dtype)
  else:
    raise ValueError(f"latent.vae={source!r} is neither an export (no {INFO_FILE}) nor a training workdir "
                     "(no checkpoints/)")
  vae_info = load_info(target)
  return dict(source=os.path.abspath(source), dir=VAE_DIR, task=vae_info["task"], step=vae_info["step"],
              config_hash=vae_info["config_hash"])


# --------------------------------------------------------------------------- load

def load_info(path: str) -> dict:
  """export.json of an export, checked: every listed file present with its recorded size."""
  if not os.path.isdir(path):
    raise BadExport(f"{path} is not a directory: no export there")
  info_path = os.path.join(path, INFO_FILE)
  if not os.path.isfile(info_path):
    raise BadExport(f"{path} is missing {INFO_FILE}: not a finished export")
  try:
    with open(info_path) as f:
      info = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadExport(f"{info_path} is not valid JSON (truncated?): {e}") from None
  missing_keys = [k for k in ("format", "task", "step", "dtype", "files") if k not in info]
  if missing_keys:
    raise BadExport(f"{info_path} lacks {missing_keys}")
  if info["format"] != FORMAT_VERSION:
    raise BadExport(f"{info_path} has export format {info['format']}; this code reads format {FORMAT_VERSION}")
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
    raise BadExport(f"{path} is missing {CONFIG_FILE}")
  if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
    raise BadExport(f"{path} is missing its params ({PARAMS_DIR}/)")
  for name, size in info["files"].items():
    file_path = os.path.join(path, name)
    if not os.path.isfile(file_path):
      raise BadExport(f"{path} is missing {name} (listed in {INFO_FILE})")
    if os.path.getsize(file_path) != size:
      raise BadExport(f"{path}: {name} has {os.path.getsize(file_path)} bytes, {INFO_FILE} records {size} "
                      "(truncated or replaced)")
  return info


def _compare_trees(expected: dict, saved: dict, path: str) -> None:
  """BadExport listing the leaves missing, unexpected or of another shape in the saved params."""
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  shapes = sorted(f"{k}: saved {tuple(saved[k])}, model {tuple(expected[k])}"
                  for k in set(expected) & set(saved) if tuple(expected[k]) != tuple(saved[k]))
  if missing or unexpected or shapes:
    parts = []
    if missing:
      parts.append(f"missing params {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
      parts.append(f"params the model does not have {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
      parts.append(f"shape mismatches {shapes[:8]}")
    raise BadExport(f"{path}: the params do not match the config's model: " + "; ".join(parts))


def _export_config(path: str, info: dict):
  """config.json of an export, checked against export.json and the task table."""
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      config = config_lib.from_json(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadExport(f"{path}/{CONFIG_FILE} is not valid JSON: {e}") from None
  if config.get("task", None) not in loop.TASKS:
    raise BadExport(f"{path}: config task {config.get('task', None)!r} is not a known task {sorted(loop.TASKS)}")
  if config.task != info["task"]:
    raise BadExport(f"{path}: {CONFIG_FILE} is task {config.task!r} but {INFO_FILE} says {info['task']!r}")
  return config


def _restore_export_params(path: str, target):
  """An export's params/ onto `target`, after checking its saved tree against the model's."""
  params_dir = os.path.join(path, PARAMS_DIR)
  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      metadata = checkpointer.metadata(params_dir).item_metadata
    except Exception as e:  # Orbax raises several types for unreadable metadata
      raise BadExport(f"{params_dir} is not a readable Orbax checkpoint: {type(e).__name__}: {e}") from None
    saved_tree = metadata.tree if hasattr(metadata, "tree") else metadata
    _compare_trees({k: v.shape for k, v in flatten_params(target).items()},
                   {k: v.shape for k, v in flatten_params(saved_tree).items()}, path)
    try:
      return checkpointer.restore(params_dir, target)
    except Exception as e:  # a damaged array file surfaces as a TensorStore or value error
      raise BadExport(f"{params_dir}: the params could not be read: {type(e).__name__}: {e}") from None
  finally:
    checkpointer.close()


def load_export(path: str, mesh=None) -> Export:
  """Loads an export: config, EMA params, export.json (and its VAE, for a latent model).

  mesh None: every param whole on the first local device (an evaluation on
  one device; on a host of fake CPU devices a replicated copy would repeat
  the work on each). A mesh (e.g. sharding.make_mesh(config.mesh)): params
  sharded by the config's logical rules on it, for models too big for one
  device. The device count never has to match the training run's.
  """
  path = os.path.abspath(path)
  info = load_info(path)  # BadExport naming a missing part, before anything is read
  config, _, params = restore_ema_params(path, mesh_for=lambda config: mesh)
  vae = None
  if "vae" in info:
    vae_path = os.path.join(path, info["vae"]["dir"])
    if not _is_export(vae_path):
      raise BadExport(f"{path} is missing its VAE export ({info['vae']['dir']}/{INFO_FILE})")
    vae = load_export(vae_path, mesh)
  return Export(path=path, config=config, params=params, info=info, vae=vae)
