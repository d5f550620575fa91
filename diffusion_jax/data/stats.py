"""What the input pipeline delivers, measured: `data_stats(config, num_batches=...)`.

Runs the configured pipeline (pipeline.make_dataset) for a few batches and
returns a JSON-able dict: examples, size / duration / aspect histograms,
tokens per example, packing efficiency, examples per row, examples skipped by
reason (SkipCounter) and batches/s. Sizes are those the model sees (after
the temporal crop and resizing), read back from each example's patch grid.
"""
import time

import numpy as np

from diffusion_jax.data import packing, pipeline, sources

SIDE_EDGES = (0, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1 << 20)
ASPECT_EDGES = (0.0, 0.5, 0.67, 0.9, 1.11, 1.5, 2.0, float("inf"))  # width / height
TOKEN_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 1 << 30)


class SkipCounter:
  """Examples the pipeline skipped, by reason (packing.SKIP_REASONS), summed over batches.

  The packer puts each row's count in the host-only key `skipped` [B, R];
  update() adds a batch's, so the counts work with worker processes too.
  """

  def __init__(self):
    self._counts = np.zeros(len(packing.SKIP_REASONS), np.int64)

  def update(self, batch: dict) -> None:
    if "skipped" in batch:
      self._counts += np.asarray(batch["skipped"]).reshape(-1, len(packing.SKIP_REASONS)).sum(0)

  @property
  def total(self) -> int:
    return int(self._counts.sum())

  def as_dict(self) -> dict[str, int]:
    return {reason: int(c) for reason, c in zip(packing.SKIP_REASONS, self._counts)}


def histogram(values, edges) -> dict:
  """{"edges": [...], "counts": [...]}: counts[i] of values in [edges[i], edges[i+1])."""
  counts, _ = np.histogram(np.asarray(values, np.float64), bins=np.asarray(edges, np.float64))
  return {"edges": [float(e) if e != float("inf") else "inf" for e in edges],
          "counts": [int(c) for c in counts]}


def _summary(values) -> dict:
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return {"mean": 0.0, "min": 0, "p50": 0.0, "p90": 0.0, "max": 0}
  return {"mean": float(v.mean()), "min": int(v.min()), "p50": float(np.percentile(v, 50)),
          "p90": float(np.percentile(v, 90)), "max": int(v.max())}


def data_stats(config, *, num_batches: int, split: str | None = None) -> dict:
  """Statistics of `num_batches` batches of config's pipeline (config.data.split by default).

  Builds a missing built-in dataset first. Keys: batches, rows, examples,
  unique_examples, frames (count per clip length), height_px / width_px /
  aspect_ratio / tokens_per_example_hist (histograms), tokens_per_example
  (mean/min/p50/p90/max), packing_efficiency (non-padding tokens / all),
  examples_per_row (mean and {k: rows}), skipped ({reason: count}),
  batches_per_s, real_tokens_per_s, seconds, captions (the first three).
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  data = config.data
  sources.ensure_dataset(data.name, data.data_dir, **pipeline.builder_kwargs(data))
  patch = np.asarray(tuple(data.patch), np.int64)
  dataset = pipeline.make_dataset(config, split=split or data.split, seed=int(data.shuffle_seed))
  skipped = SkipCounter()
  grids, ids, per_row, captions = [], [], [], []
  real = total = 0
  start = time.perf_counter()
  iterator = iter(dataset)
  batches = 0
  try:
    for batch in iterator:
      present = batch["example_ids"] >= 0
      grids.append(batch["grid"][present])
      ids.append(batch["example_ids"][present])
      per_row.append(present.sum(axis=1))
      if "captions" in batch and len(captions) < 3:
        captions.extend(str(c) for c in batch["captions"][present][:3 - len(captions)])
      stats = packing.batch_stats(batch)
      real += stats["real_tokens"]
      total += stats["tokens"]
      skipped.update(batch)
      batches += 1
      if batches == num_batches:
        break
  finally:
    if hasattr(iterator, "close"):
      iterator.close()  # stops worker processes
  seconds = time.perf_counter() - start
  grid = np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)
  sizes = grid * patch  # (frames, height, width) in pixels (or latents)
  tokens = grid.prod(axis=1)
  rows = np.concatenate(per_row) if per_row else np.zeros(0, np.int64)
  frames, frame_counts = np.unique(sizes[:, 0], return_counts=True)
  row_k, row_counts = np.unique(rows, return_counts=True)
  return {
      "batches": batches,
      "rows": int(rows.size),
      "examples": int(grid.shape[0]),
      "unique_examples": int(np.unique(np.concatenate(ids)).size) if ids else 0,
      "frames": {str(int(f)): int(c) for f, c in zip(frames, frame_counts)},
      "height_px": histogram(sizes[:, 1], SIDE_EDGES),
      "width_px": histogram(sizes[:, 2], SIDE_EDGES),
      "aspect_ratio": histogram(sizes[:, 2] / np.maximum(sizes[:, 1], 1), ASPECT_EDGES),
      "tokens_per_example": _summary(tokens),
      "tokens_per_example_hist": histogram(tokens, TOKEN_EDGES),
      "packing_efficiency": real / max(total, 1),
      "examples_per_row": {"mean": float(rows.mean()) if rows.size else 0.0,
                           "rows": {str(int(k)): int(c) for k, c in zip(row_k, row_counts)}},
      "skipped": skipped.as_dict(),
      "batches_per_s": batches / seconds,
      "real_tokens_per_s": real / seconds,
      "seconds": seconds,
      "captions": captions,
  }
