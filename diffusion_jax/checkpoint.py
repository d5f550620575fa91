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
save cut short by a crash is never the one restored.
"""
import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from diffusion_jax import config as config_lib

# Config sections that define the parameters' shapes: a checkpoint whose values
# here differ from the current config's belongs to another model.
MODEL_DEFINING_FIELDS = ("task", "model", "data.patch", "data.channels")


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of another model."""


def make_manager(workdir: str, *, keep: int, create: bool = True) -> ocp.CheckpointManager:
  """Keeps the newest `keep` checkpoints under WORKDIR/checkpoints; saves are async."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not create and not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir}")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=create)
  return ocp.CheckpointManager(
      directory,
      options=options,
      item_names=("state", "data", "config", "extras"),
  )


def save(manager, step: int, state, data_iterator, config, *, force=False, extras=None) -> bool:
  """Starts an async save; returns whether a save was started. `extras`: a JSON-able dict or None."""
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
  if step is None or not os.path.isdir(os.path.join(os.fspath(manager.directory), str(step), "extras")):
    return None
  return manager.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))["extras"]


def _field(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part] if part in node else None
    if node is None:
      return None
  return node


def check_same_model(saved, current, workdir) -> None:
  """Refuses to resume from a checkpoint of a different model (nothing is overwritten)."""
  current = config_lib.from_json(config_lib.to_json(current))  # tuples become lists, as saved
  for name in MODEL_DEFINING_FIELDS:
    a, b = _field(saved, name), _field(current, name)
    a = a.to_dict() if hasattr(a, "to_dict") else a
    b = b.to_dict() if hasattr(b, "to_dict") else b
    if a != b:
      raise CheckpointMismatch(
          f"{workdir} holds a checkpoint of a different model: {name} is {a!r} there but {b!r} in this "
          "config; use another --workdir")


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
