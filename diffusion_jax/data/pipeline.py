"""Grain input pipeline: tfds source -> per-process shard -> packed batches -> global jax.Arrays.

  source (tfds ArrayRecord, random access; data.cache_examples: decoded once, kept)
    -> [process_index::process_count]      disjoint shard per process
    -> shuffle(seed) -> repeat(num_epochs)  a new order every epoch
    -> PrepareExample (random_map)          check; temporal crop to 1+4k frames; resize
                                            to data.max_area and to fit L (plan_shape);
                                            uint8 -> float32 in [-1, 1]; patchify.
                                            A bad example becomes a skip record.
    -> to_iter_dataset -> pack              rows of L tokens, <= K examples (packing.py)
    -> batch(local_batch)                   numpy dicts [local_batch, ...]
    -> mp_prefetch (data.num_workers > 0)   Grain worker processes

Each process then calls make_global_batch to assemble the global batch, whose
rows are split over the mesh's ('data', 'fsdp') axes. Host-only keys
(packing.HOST_KEYS: `captions`, `skipped`) stay in the host batch.

config.data keys read here (the optional ones with their defaults):
  name, split, data_dir, patch, channels, tokens_per_row, examples_per_row, num_workers
  image_size                  the side of the examples an image model sees (pixels, or latents of an encoded
                              dataset); with model.family='unet' other sizes are skipped as "wrong_size".
                              Also digits_canvas's canvas side (its builder argument)
  builder = {}                arguments of another built-in builder (sources.ensure_dataset)
  max_frames = 0              longest clip after the temporal crop (0: the source's length)
  max_area = 0                down-resize frames above this many pixels (0: never)
  min_side = 4 patches        the fit-to-L rule shrinks the shorter side no further
  pack_open_rows = 8          BestFitPacker's open rows
  pack_buffer = 32            BestFitPacker's buffer of waiting examples
  text_tokens_per_row = 0     Lt: packed caption-token budget of a row (0 = no text in the batch)
  cache_examples = False      decode each record of this process's shard once and keep it in memory
  read_threads = 16           Grain's reader threads (read_options)

Encoded datasets (diffusion_jax/encode.py; data.name is their directory)
carry each caption's text-encoder tokens (`text`, packed into `text` /
`text_segment_ids` rows) and either pixels (`video`) or a causal VAE's
posterior (`latent_mean`, `latent_logvar`). A latent example is sampled
z = mean + exp(logvar / 2) n (LDM's convention: the posterior, not its mean)
and normalised per channel, (z - mean_c) / std_c, with the latent statistics
stored in the dataset's metadata by `encode` from the VAE's checkpoint, so a
diffusion model always trains on unit-variance latents. Latent clips are cut
to a prefix of latent frames (by causality a prefix of latents is exactly the
encoding of a prefix of frames) and centre-cropped spatially to fit L.

Checkpointing: the iterator from iter(make_dataset(...)) has get_state() /
set_state(); its state is JSON (the packer's buffer and open rows included),
one file per process. With Orbax, save and restore it next to the train state:

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter)))  # sets data_iter's state in place
"""
import dataclasses
import math
import os
from typing import Any

from absl import flags
import grain
import jax
import numpy as np

from diffusion_jax import patches, paths
from diffusion_jax.data import encoded, imaging, packing, sources

FRAME_STEP = 4  # clips are cut to 1 + 4k frames: what a causal video VAE with 4x time compression takes


def builder_kwargs(data_config) -> dict[str, Any]:
  """Arguments a built-in builder takes from config.data (none for a dataset directory)."""
  if data_config.name not in sources.BUILDERS:
    return {}
  if data_config.name == "digits_canvas":
    return {"image_size": int(data_config.image_size)}
  return dict(data_config.builder)


# --------------------------------------------------------------------------- sizes

def allowed_frames(frames: int, pt: int) -> int:
  """The longest usable clip length <= frames, 0 if none.

  With pt == 1: 1 + 4k (an image is 1; a causal video VAE maps 1 + 4k frames
  to 1 + k latents). With a temporal patch pt > 1: a multiple of pt.
  """
  if frames < 1:
    return 0
  if pt == 1:
    return 1 + (frames - 1) // FRAME_STEP * FRAME_STEP
  return frames // pt * pt


def _floor_to(x: float, multiple: int) -> int:
  return max(multiple, int(math.floor(x / multiple + 1e-9)) * multiple)


def plan_shape(frames: int, height: int, width: int, *, patch, tokens_per_row: int, max_area: int = 0,
               max_frames: int = 0, min_side: int = 0) -> tuple[int, int, int] | None:
  """(frames, height, width) an example is cut and resized to, or None when it cannot fit.

  The rule, in order:
    1. frames: the longest allowed_frames() length <= min(frames, max_frames).
    2. area: above max_area pixels, both sides scale by sqrt(max_area / (H W)).
    3. sides are floored to multiples of the patch (at least one patch).
    4. fit: above L = tokens_per_row tokens, both sides shrink by one factor
       (aspect kept) to fit L / T' tokens per frame, the shorter side not
       below min_side; if that is not enough, frames are cut to the longest
       allowed length that fits at min_side. If one frame at min_side is still
       more than L tokens (an extreme aspect ratio), None: skip as too_big.
  Never upsamples, except a side shorter than one patch, which becomes one patch.
  """
  pt, ph, pw = (int(p) for p in patch)
  frames = allowed_frames(min(frames, max_frames) if max_frames else frames, pt)
  if frames == 0:
    return None
  scale = 1.0
  if max_area and height * width > max_area:
    scale = math.sqrt(max_area / (height * width))

  def sides(s):
    return _floor_to(height * s, ph), _floor_to(width * s, pw)

  def tokens_per_frame(h, w):
    return (h // ph) * (w // pw)

  h, w = sides(scale)
  if frames // pt * tokens_per_frame(h, w) <= tokens_per_row:
    return frames, h, w
  budget = tokens_per_row // (frames // pt)
  fit = scale * math.sqrt(budget / tokens_per_frame(h, w))
  while fit > 0 and tokens_per_frame(*sides(fit)) > budget:
    fit *= 0.98
  floor_scale = min(scale, min_side / min(height, width))  # the smallest scale allowed
  if fit > 0 and fit >= floor_scale and tokens_per_frame(*sides(fit)) <= budget:
    return (frames, *sides(fit))
  h, w = sides(floor_scale)
  per_frame = tokens_per_frame(h, w)
  if per_frame > tokens_per_row:
    return None
  return allowed_frames(tokens_per_row // per_frame * pt, pt), h, w


# --------------------------------------------------------------------------- decode

@dataclasses.dataclass(frozen=True)
class PrepareExample(grain.transforms.RandomMap):
  """tfds example -> packer example, or a packing.skip_record naming why it was unusable.

  Pixels go to [-1, 1] (DDPM's convention): uint8 as x / 127.5 - 1, a float
  source (taken to be in [0, 1]) as 2x - 1. A [H, W, C] image is one frame.
  The temporal crop starts at a random frame; sizes follow plan_shape. A clip
  that keeps its size is centre-cropped to patch multiples, others resized.
  """

  patch: tuple[int, int, int]
  channels: int
  tokens_per_row: int
  max_area: int = 0
  max_frames: int = 0
  min_side: int = 0

  latent_mean: tuple = ()
  latent_std: tuple = ()
  text_tokens_per_row: int = 0
  fixed_side: int = 0  # > 0: the model takes only side x side examples (the U-Net); others are skipped

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    example = self._latent_example(element, rng) if "latent_mean" in element else self._pixel_example(element, rng)
    if self.fixed_side and "skipped" not in example:
      if tuple(example["grid"][1:] * np.asarray(self.patch[1:])) != (self.fixed_side, self.fixed_side):
        return packing.skip_record("wrong_size")
    if "skipped" not in example and self.text_tokens_per_row and "text" in element:
      text = np.asarray(element["text"], np.float32)[:int(element.get("text_length", len(element["text"])))]
      example["text"] = text[:self.text_tokens_per_row]
    return example

  def _latent_example(self, element: dict, rng: np.random.Generator) -> dict:
    mean = np.asarray(element["latent_mean"], np.float32)
    logvar = np.asarray(element["latent_logvar"], np.float32)
    if mean.ndim != 4 or mean.shape != logvar.shape or 0 in mean.shape:
      return packing.skip_record("bad_shape")
    if mean.shape[-1] != self.channels:
      return packing.skip_record("bad_channels")
    if not (np.isfinite(mean).all() and np.isfinite(logvar).all()):
      return packing.skip_record("non_finite")
    frames, height, width = mean.shape[:3]
    pt, ph, pw = self.patch
    height, width = height // ph * ph, width // pw * pw
    if height == 0 or width == 0:
      return packing.skip_record("bad_shape")
    per_frame = (height // ph) * (width // pw)
    if per_frame > self.tokens_per_row:  # centre-crop both sides by one factor to fit one frame in L
      scale = np.sqrt(self.tokens_per_row / per_frame)
      height = max(ph, int(height * scale) // ph * ph)
      width = max(pw, int(width * scale) // pw * pw)
      per_frame = (height // ph) * (width // pw)
    limit = self.tokens_per_row // per_frame * pt
    if self.max_frames:
      limit = min(limit, self.max_frames)
    frames = min(frames, limit) // pt * pt
    if frames == 0:
      return packing.skip_record("too_big")
    top, left = (mean.shape[1] - height) // 2, (mean.shape[2] - width) // 2
    window = (slice(0, frames), slice(top, top + height), slice(left, left + width))
    z = mean[window] + np.exp(0.5 * logvar[window]) * rng.standard_normal(mean[window].shape).astype(np.float32)
    if self.latent_mean:
      z = (z - np.asarray(self.latent_mean, np.float32)) / np.asarray(self.latent_std, np.float32)
    tokens, positions, grid = patches.patchify(z, self.patch)
    return dict(patches=tokens, positions=positions, grid=np.asarray(grid, np.int32),
                id=int(element["id"]), label=int(element["label"]), caption=element.get("caption", b""))

  def _pixel_example(self, element: dict, rng: np.random.Generator) -> dict:
    video = np.asarray(element["video"])
    if video.ndim == 3:
      video = video[None]
    if video.ndim != 4 or 0 in video.shape[1:3]:
      return packing.skip_record("bad_shape")
    if video.shape[0] == 0:
      return packing.skip_record("no_frames")
    if video.shape[-1] != self.channels:
      return packing.skip_record("bad_channels")
    if video.dtype == np.uint8:
      scale, offset = 1 / 127.5, -1.0
    elif np.issubdtype(video.dtype, np.floating):
      if not np.isfinite(video).all():
        return packing.skip_record("non_finite")
      scale, offset = 2.0, -1.0
    else:
      raise ValueError(f"video dtype {video.dtype} is neither uint8 nor float (example id {element['id']})")
    t, h, w = video.shape[:3]
    plan = plan_shape(t, h, w, patch=self.patch, tokens_per_row=self.tokens_per_row,
                      max_area=self.max_area, max_frames=self.max_frames, min_side=self.min_side)
    if plan is None:
      return packing.skip_record("no_frames" if allowed_frames(t, self.patch[0]) == 0 else "too_big")
    frames, out_h, out_w = plan
    start = int(rng.integers(0, t - frames + 1))
    video = video[start:start + frames]
    pixels = video.astype(np.float32) * np.float32(scale) + np.float32(offset)
    if (out_h, out_w) == (h // self.patch[1] * self.patch[1], w // self.patch[2] * self.patch[2]):
      top, left = (h - out_h) // 2, (w - out_w) // 2
      pixels = pixels[:, top:top + out_h, left:left + out_w]
    else:
      pixels = imaging.resize_frames(pixels, out_h, out_w)
    pixels = np.clip(pixels, -1.0, 1.0)
    tokens, positions, grid = patches.patchify(pixels, self.patch)
    return dict(patches=tokens, positions=positions, grid=np.asarray(grid, np.int32),
                id=int(element["id"]), label=int(element["label"]), caption=element.get("caption", b""))


# --------------------------------------------------------------------------- datasets

def _pad_batch(rows: list[dict], batch_size: int) -> dict[str, np.ndarray]:
  """Stacks rows; a short final batch gets empty rows (all padding, ids -1, no captions)."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  missing = batch_size - len(rows)
  if missing:
    for key, value in batch.items():
      fill = -1 if key in ("example_ids", "labels") else "" if value.dtype.kind == "U" else 0
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

  source = sources.open_source(data.name, split, data.data_dir, **builder_kwargs(data))
  stats = encoded.latent_stats(data)
  if len(source) < process_count:
    raise ValueError(f"split {split!r} has {len(source)} examples, fewer than {process_count} processes")
  # A convolutional backbone takes one grid only; the DiT takes any size, image_size or not.
  fixed_side = int(data.image_size) if config.model.family == "unet" else 0
  if fixed_side:
    _check_fixed_side(source[0], fixed_side, data.name)
  if data.get("cache_examples", False):  # optional: configs saved before the field existed lack it
    source = _DecodedOnce(source)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  prepare = PrepareExample(
      patch=patch, channels=int(data.channels), tokens_per_row=tokens_per_row,
      max_area=int(data.max_area), max_frames=int(data.max_frames),
      # data.min_side is optional: its default, 4 patches, depends on data.patch
      min_side=int(data.get("min_side", 4 * max(patch[1:]))),
      latent_mean=tuple(stats["mean"]) if stats else (), latent_std=tuple(stats["std"]) if stats else (),
      text_tokens_per_row=int(data.text_tokens_per_row), fixed_side=fixed_side)
  ds = ds.random_map(prepare, seed=seed)
  ds = ds.to_iter_dataset(read_options(data))
  ds = packing.pack(ds, tokens_per_row=tokens_per_row, examples_per_row=examples_per_row,
                    num_open_rows=int(data.pack_open_rows),
                    buffer_size=int(data.pack_buffer),
                    text_tokens_per_row=int(data.text_tokens_per_row))
  if drop_remainder:
    ds = ds.batch(local_batch, drop_remainder=True)
  else:
    ds = ds.batch(local_batch, batch_fn=lambda rows: _pad_batch(rows, local_batch))
  if int(data.num_workers) > 0:
    _mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data.num_workers)))
  return ds


def read_options(data) -> grain.ReadOptions:
  """Grain's reader threads of every task's pipeline: data.read_threads (configs saved before the
  field existed: Grain's 16). Threads overlap slow reads (a bucket); 0 prepares each example in
  the main thread, which Grain advises for data already in memory: on a 2-core host the threads'
  GIL hand-offs doubled the quickstart's host time per batch (BENCHMARKS.md)."""
  threads = int(data.get("read_threads", 16))
  if threads < 0:
    raise ValueError(f"data.read_threads must be >= 0, got {threads}")
  # Grain's default read-ahead of 500 examples costs a scan of that buffer per example (its depth
  # statistic), ~45% of the quickstart's host time; 64 keeps the reader threads as busy.
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64 if threads else 0)


class _DecodedOnce:
  """A random-access source that keeps each record after its first read.

  Reading a record (ArrayRecord + tfds's zlib decode) costs more host time
  than preparing it, and on a small machine that time is taken from the train
  step; a dataset of a few hundred MB read once per epoch for hours is better
  kept. It holds every record this process reads, i.e. its whole shard: opt
  in for small datasets only (data.cache_examples). Grain reads with threads;
  two threads filling one slot at once store the same record, which is harmless.
  """

  def __init__(self, source):
    self._source = source
    self._records = [None] * len(source)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int):
    record = self._records[index]
    if record is None:
      record = self._records[index] = self._source[index]
    return record


def _check_fixed_side(element: dict, side: int, name: str) -> None:
  """A fixed-size model on data of another size would skip every example: say so before training."""
  array = element["latent_mean"] if "latent_mean" in element else element["video"]
  shape = np.shape(array)[-3:-1]
  if shape != (side, side):
    kind = "latents" if "latent_mean" in element else "images"
    raise ValueError(f"data.image_size={side} but the {kind} of {name} are {shape[0]}x{shape[1]}; a fixed-size "
                     f"model needs data.image_size to match them")


def _mark_absl_flags_parsed():
  """Grain's worker processes read absl flags; a library caller may never have parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Each process's rows -> global jax.Arrays with `sharding` (e.g. sharding.batch_sharding(mesh)).

  The global leading dim is the concatenation of every process's rows in
  process order; a PartitionSpec naming only the leading axis leaves every
  other axis replicated. Host-only keys (packing.HOST_KEYS: captions, skip
  counts) are left out. Dtypes follow JAX's canonicalisation: the int64
  example_ids become int32 unless jax_enable_x64 is on (the host batch keeps
  int64 for exactly-once audits). A packed batch whose segment ids or
  conditioning mask contradict each other is a ValueError
  (packing.check_packed_batch), not silent garbage in the model.
  """
  packing.check_packed_batch(local_batch)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items() if key not in packing.HOST_KEYS}
