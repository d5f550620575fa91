"""Orbax checkpoints of a run: train state, each process's data-iterator state, config.

One step directory holds three items:
  state   the TrainState (params, opt_state, EMA, step, rng), restored onto
          whatever mesh the abstract target carries, so any topology can read it;
  data    the Grain iterator state, one JSON file per process;
  config  the run's config as JSON (read back without pickle or eval);
  extras  optional JSON a task computes from that step's params (the loop's
          checkpoint_extras hook, e.g. a VAE's latent statistics), so it
          always matches the params saved beside it.
Orbax writes into a temporary directory and renames it when complete, so a
save cut short by a crash is never the one restored. Orbax does not checksum
what it wrote, so once a step has committed, `seal` writes STEP/sha256.json
(every file's sha256); `verify` checks it before a restore and
`restore_newest_good` falls back to the newest step that verifies and
restores, with a warning naming each bad one. The directory may be local or a
bucket (gs://), through paths.py.
"""
import json
import os
import sys

import grain
import jax
import orbax.checkpoint as ocp

from diffusion_jax import config as config_lib
from diffusion_jax import paths

# Config sections that define the parameters' shapes, and the optimizer that defines the optimizer
# state's: a checkpoint whose values here differ from the current config's cannot be restored into it.
MODEL_DEFINING_FIELDS = ("task", "model", "data.patch", "data.channels", "train.optimizer")
# Fields that checkpoints written before them lack, with the value those runs had.
OLDER_CHECKPOINT_VALUES = {"train.optimizer": "adamw", "train.muon_lr_scale": 1.0}
# What a resumed run must also keep unless the user allows the change by name
# (`train --allow-change=FIELD,...`): the data it learns from, the VAE and text
# encoder that define its inputs, and the optimizer's settings.
RUN_DEFINING_FIELDS = ("data.name", "data.builder", "latent.vae", "latent.mean", "latent.std",
                       "text.encoder_dir", "text.max_length", "train.lr", "train.lr_schedule",
                       "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.ema_decay",
                       "train.muon_lr_scale")
MANIFEST_FILE = "sha256.json"


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of another model."""


def make_manager(workdir: str, *, keep: int, create: bool = True) -> ocp.CheckpointManager:
  """Keeps the newest `keep` checkpoints under WORKDIR/checkpoints; saves are async."""
  directory = paths.join(paths.absolute(workdir), "checkpoints")
  if not create and not paths.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir}")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=create)
  return ocp.CheckpointManager(
      directory,
      options=options,
      item_names=("state", "data", "config", "extras"),
  )


def save(manager, step: int, state, data_iterator, config, *, force=False, extras=None) -> bool:
  """Starts an async save; returns whether a save was started. `extras`: a JSON-able dict or None.

  The previous save is finished and sealed first (Orbax would wait for it anyway).
  """
  manager.wait_until_finished()
  seal(manager)
  args = dict(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict()),
  )
  if extras is not None:
    args["extras"] = ocp.args.JsonSave(extras)
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def saved_config(manager, step=None):
  """The config stored with a checkpoint (newest by default), or None if none exists."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_lib.from_json(json.dumps(restored["config"]))


def saved_extras(manager, step=None):
  """The extras JSON saved with a checkpoint (newest by default); None if none was saved."""
  step = manager.latest_step() if step is None else step
  if step is None or not paths.isdir(paths.join(step_dir(manager, step), "extras")):
    return None
  return manager.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))["extras"]


def _field(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part] if part in node else None
    if node is None:
      return None
  return node


def check_same_model(saved, current, workdir, allow_changes=()) -> None:
  """Refuses to resume from a checkpoint of a different model, or of the same model trained on other
  data, with another VAE or text encoder, or other optimizer settings (RUN_DEFINING_FIELDS), unless
  that field is in `allow_changes`. Nothing is overwritten."""
  unknown = sorted(set(allow_changes) - set(RUN_DEFINING_FIELDS))
  if unknown:
    raise CheckpointMismatch(f"--allow-change {unknown}: only {list(RUN_DEFINING_FIELDS)} may change on resume "
                             "(the model's own fields never can)")
  current = config_lib.from_json(config_lib.to_json(current))  # tuples become lists, as saved
  for name in MODEL_DEFINING_FIELDS + RUN_DEFINING_FIELDS:
    if name in allow_changes:
      continue
    a, b = _field(saved, name), _field(current, name)
    if a is None:
      a = OLDER_CHECKPOINT_VALUES.get(name)
    a = a.to_dict() if hasattr(a, "to_dict") else a
    b = b.to_dict() if hasattr(b, "to_dict") else b
    if a != b:
      if name in MODEL_DEFINING_FIELDS:
        raise CheckpointMismatch(
            f"{workdir} holds a checkpoint of a different model: {name} is {a!r} there but {b!r} in this "
            "config; use another --workdir")
      raise CheckpointMismatch(
          f"{workdir} holds a run with {name}={a!r}, this config has {b!r}; to resume it with the change "
          f"on purpose, add --allow-change={name}; else use another --workdir")


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs that carry the target shardings, for a restore onto any mesh."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def restore(manager, step, abstract_state, data_iterator=None):
  """Restores the state (onto the shardings in `abstract_state`) and the iterator in place."""
  args = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored["state"]


def restore_ema_params(manager, step, target):
  """The saved state's EMA params alone, onto the shardings in `target` (abstract EMA params).

  A partial restore: Orbax reads only the leaves under the keys the target
  names, so the optimizer's moments and the raw params (3/4 of a checkpoint
  with Adam) are never read from storage.
  """
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"ema_params": target},
      restore_args={"ema_params": ocp.checkpoint_utils.construct_restore_args(target)},
      partial_restore=True)))
  return restored["state"]["ema_params"]


# --------------------------------------------------------------------------- integrity

class CorruptCheckpoint(ValueError):
  """A committed checkpoint step whose files do not match its sha256 manifest."""


def step_dir(manager, step: int) -> str:
  return paths.join(os.fspath(manager.directory), str(step))


def seal(manager) -> list[int]:
  """Writes STEP/sha256.json for every committed step that lacks one; returns those steps.

  Call after a save has committed (manager.wait_until_finished()). Only
  process 0 writes; it hashes every file of the step, so the cost is one read
  of the checkpoint (measured in the README). A step without a manifest (a run
  killed between the commit and this) still restores, reported as unverified.
  """
  if jax.process_index() != 0:
    return []
  sealed = []
  for step in manager.all_steps():
    directory = step_dir(manager, step)
    if paths.exists(paths.join(directory, MANIFEST_FILE)):
      continue
    files = {name: paths.sha256(paths.join(directory, name)) for name in paths.walk_files(directory)}
    paths.replace_text(paths.join(directory, MANIFEST_FILE), json.dumps(files, indent=0, sort_keys=True))
    sealed.append(step)
  return sealed


def verify(manager, step: int) -> bool:
  """True when STEP's files match its manifest, False when it has none; CorruptCheckpoint naming
  the first file missing, added or changed otherwise."""
  directory = step_dir(manager, step)
  manifest_path = paths.join(directory, MANIFEST_FILE)
  if not paths.exists(manifest_path):
    return False
  try:
    expected = json.loads(paths.read_text(manifest_path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorruptCheckpoint(f"{manifest_path} is not valid JSON: {e}") from None
  present = set(paths.walk_files(directory)) - {MANIFEST_FILE}
  for name in sorted(set(expected) | present):
    if name not in present:
      raise CorruptCheckpoint(f"step {step}: {name} is missing (listed in {MANIFEST_FILE})")
    if name not in expected:
      raise CorruptCheckpoint(f"step {step}: {name} was added after the save")
    if paths.sha256(paths.join(directory, name)) != expected[name]:
      raise CorruptCheckpoint(f"step {step}: {name} does not match its sha256 in {MANIFEST_FILE} (corrupted)")
  return True


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def newest_config(manager):
  """The config of the newest step whose config item reads (None without checkpoints)."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return saved_config(manager, step)
    except Exception as e:  # a damaged step: restore_newest_good reports and skips it too
      _warn(f"checkpoint step {step} in {manager.directory}: its config does not read ({type(e).__name__})")
  return None


def restore_newest_good(manager, abstract_state, data_iterator=None):
  """(step, state) of the newest checkpoint that verifies and restores, or (None, None) when there is
  none at all. A bad step (corrupt, partial, unreadable) is reported with a warning naming it and the
  next older one is tried; ValueError when every step is bad."""
  steps = sorted(manager.all_steps(), reverse=True)
  bad = []
  for step in steps:
    try:
      if not verify(manager, step):
        _warn(f"checkpoint step {step} in {manager.directory} has no {MANIFEST_FILE} (killed before sealing); "
              "restoring it unverified")
      state = restore(manager, step, abstract_state, data_iterator)
    except Exception as e:  # Orbax, TensorStore and Grain raise many types for damaged files
      bad.append(step)
      _warn(f"checkpoint step {step} in {manager.directory} is corrupt or partial ({type(e).__name__}: "
            f"{str(e)[:300]}); falling back to an older step")
      continue
    if bad:
      for b in bad:  # else the run's next save of that step would collide with it
        manager.delete(b)
      _warn(f"resumed from step {step}; deleted the newer step(s) {bad}, which could not be restored")
    return step, state
  if bad:
    raise ValueError(f"every checkpoint in {manager.directory} is corrupt or partial: steps {bad}")
  return None, None
