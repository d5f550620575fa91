"""Grain input pipeline: tfds source -> per-process shard -> packed batches -> global jax.Arrays.

  source (tfds ArrayRecord, random access)
    -> [process_index::process_count]      disjoint shard per process
    -> shuffle(seed) -> repeat(num_epochs)  a new order every epoch
    -> decode                               uint8 video -> float32 in [-1, 1] -> patchify
    -> to_iter_dataset -> pack              rows of L tokens, <= K examples (packing.py)
    -> batch(local_batch)                   numpy dicts [local_batch, ...]
    -> mp_prefetch (data.num_workers > 0)   Grain worker processes

Each process then calls make_global_batch to assemble the global batch, whose
rows are split over the mesh's ('data', 'fsdp') axes.

Checkpointing: the iterator from iter(make_dataset(...)) has get_state() /
set_state(); its state is JSON (the packer's open rows included), one file
per process. With Orbax, save and restore it next to the train state:

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter)))  # sets data_iter's state in place
"""
import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from diffusion_jax.data import packing, sources


def builder_kwargs(data_config) -> dict[str, Any]:
  """Arguments a built-in builder takes from config.data (none for a dataset directory)."""
  if data_config.name not in sources.BUILDERS:
    return {}
  return {"image_size": int(data_config.image_size)}


@dataclasses.dataclass(frozen=True)
class DecodeAndPatchify(grain.transforms.Map):
  """tfds example -> packer example: pixels to [-1, 1] (DDPM's convention), spacetime patches."""

  patch: tuple[int, int, int]
  channels: int

  def map(self, element: dict) -> dict:
    video = np.asarray(element["video"])
    if video.ndim != 4 or video.shape[-1] != self.channels:
      raise ValueError(f"expected a video [T, H, W, {self.channels}], got shape {video.shape}")
    pixels = video.astype(np.float32) / 127.5 - 1.0
    tokens, positions, grid = packing.patchify(pixels, self.patch)
    return dict(patches=tokens, positions=positions, grid=np.asarray(grid, np.int32),
                id=int(element["id"]), label=int(element["label"]))


def _pad_batch(rows: list[dict], batch_size: int) -> dict[str, np.ndarray]:
  """Stacks rows; a short final batch gets empty rows (all padding, ids -1)."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  missing = batch_size - len(rows)
  if missing:
    for key, value in batch.items():
      fill = -1 if key in ("example_ids", "labels") else 0
      batch[key] = np.concatenate([value, np.full((missing,) + value.shape[1:], fill, value.dtype)])
  return batch


def make_dataset(config, *, split: str, process_index: int = 0, process_count: int = 1, seed: int = 0,
                 num_epochs: int | None = None, drop_remainder: bool = True) -> grain.IterDataset:
  """This process's packed batches, dicts of numpy arrays [global_batch // process_count, ...].

  num_epochs None repeats forever. With drop_remainder False the last short
  batch is padded with empty rows instead (for one-epoch evaluation).
  The dataset must exist already (sources.ensure_dataset builds a built-in one).
  """
  data = config.data
  global_batch = int(config.train.global_batch)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if global_batch % process_count:
    raise ValueError(f"train.global_batch={global_batch} is not divisible by process_count={process_count}")
  local_batch = global_batch // process_count
  patch = tuple(int(p) for p in data.patch)
  tokens_per_row, examples_per_row = int(data.tokens_per_row), int(data.examples_per_row)
  if data.name in sources.BUILDERS:  # fixed-size images: fail before the first batch, not in a worker
    per_image = (int(data.image_size) // patch[1]) * (int(data.image_size) // patch[2])
    if per_image > tokens_per_row:
      raise ValueError(
          f"a {data.image_size}px image in patches {patch} has {per_image} tokens, more than "
          f"data.tokens_per_row={tokens_per_row}")

  source = sources.open_source(data.name, split, data.data_dir, **builder_kwargs(data))
  if len(source) < process_count:
    raise ValueError(f"split {split!r} has {len(source)} examples, fewer than {process_count} processes")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(DecodeAndPatchify(patch=patch, channels=int(data.channels)))
  ds = ds.to_iter_dataset()
  ds = packing.pack(ds, tokens_per_row=tokens_per_row, examples_per_row=examples_per_row)
  if drop_remainder:
    ds = ds.batch(local_batch, drop_remainder=True)
  else:
    ds = ds.batch(local_batch, batch_fn=lambda rows: _pad_batch(rows, local_batch))
  if int(data.num_workers) > 0:
    _mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data.num_workers)))
  return ds


def _mark_absl_flags_parsed():
  """Grain's worker processes read absl flags; a library caller may never have parsed them."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Each process's rows -> global jax.Arrays with `sharding` (e.g. sharding.batch_sharding(mesh)).

  The global leading dim is the concatenation of every process's rows in
  process order; a PartitionSpec naming only the leading axis leaves every
  other axis replicated. Dtypes follow JAX's canonicalisation: the int64
  example_ids become int32 unless jax_enable_x64 is on (the host batch keeps
  int64 for exactly-once audits).
  """
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}
