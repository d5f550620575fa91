"""Packing vs padding vs Open-Sora-style buckets on the mixed moving_digits data, in one run.

  python benchmarks/packing.py [--data_dir=DIR] [--tokens_per_row=4096] [--rows=4] [--batches=20]

The data: moving_digits (default build: 24-96 px sides, 1-33 frames), cut to
<= 17 frames and <= 64x64 px (data.max_area), patches (1, 4, 4), so examples
run from 36 to 4352 tokens before the fit-to-L rule. Every strategy sees the
same epoch (all 2000 training clips, one shuffled order) and the same token
budget: a batch is `rows` x L tokens.

  packing     pipeline.plan_shape fits each clip into L, BestFitPacker fills rows
  pad to L    one clip per row, padded to L (plan_shape's fit rule too)
  pad to max  one clip per row, padded to the epoch's largest clip
  buckets     Open-Sora style: each clip is resized/cropped to the nearest of a
              fixed set of (frames, area, aspect-ratio) shapes; a bucket's batch
              holds as many clips as fit rows x L tokens; each bucket is its own
              batch shape, i.e. its own compilation. Partial batches are padded.

The strategies are compared on clip sizes alone (each clip's shape from
pipeline.plan_shape; the packer decides on token counts only), so no pixels
are decoded twice. Columns: efficiency = non-padding tokens / tokens computed; kept = tokens the
model sees / tokens of the clip at its native (cropped, max_area) size; shapes =
distinct batch shapes over the epoch (= compilations of the train step). Then
pipeline throughput with 0 and 2 Grain worker processes. Prints markdown.
"""
import argparse
import math
import time

import numpy as np

from diffusion_jax import config_defaults
from diffusion_jax.data import packing, pipeline, sources

PATCH = (1, 4, 4)
MAX_AREA = 64 * 64
MAX_FRAMES = 17
MIN_SIDE = 16
# Open-Sora-style bucket axes, scaled to this data: areas (px), aspect ratios (w / h), frames.
BUCKET_AREAS = (24 * 24, 32 * 32, 48 * 48, 64 * 64)
BUCKET_RATIOS = (0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0)
BUCKET_FRAMES = (1, 5, 9, 17)


def _config(data_dir, tokens_per_row, examples_per_row, rows, num_workers):
  return config_defaults.recipe(
      "dit",
      data=dict(name="moving_digits", data_dir=data_dir, patch=PATCH, channels=3, tokens_per_row=tokens_per_row,
                examples_per_row=examples_per_row, num_workers=num_workers, max_area=MAX_AREA,
                max_frames=MAX_FRAMES, min_side=MIN_SIDE),
      train=dict(global_batch=rows))


def _tokens(shape):
  t, h, w = shape
  return (t // PATCH[0]) * (h // PATCH[1]) * (w // PATCH[2])


def _bucket(frames, height, width):
  """Open-Sora's rule: largest area bucket <= the clip's, nearest aspect ratio, longest frames <= T."""
  area = height * width
  bucket_area = max([a for a in BUCKET_AREAS if a <= area] or [BUCKET_AREAS[0]])
  ratio = min(BUCKET_RATIOS, key=lambda r: abs(math.log(r * height / width)))
  h = max(4, round(math.sqrt(bucket_area / ratio) / 4) * 4)
  w = max(4, round(math.sqrt(bucket_area * ratio) / 4) * 4)
  return max(f for f in BUCKET_FRAMES if f <= frames), h, w


def _pack(sizes, L, K, open_rows, buffer):
  examples = [dict(patches=np.zeros((n, 1), np.float32), positions=np.zeros((n, 3), np.int32), id=i)
              for i, n in enumerate(sizes)]
  rows = packing.pack_examples(examples, L, K, open_rows, buffer)
  return len(rows), max(int((r["example_ids"] >= 0).sum()) for r in rows)


def compare(data_dir, L, K, B):
  source = sources.open_source("moving_digits", "train", data_dir)
  order = np.random.default_rng(0).permutation(len(source))
  shapes = [source[int(i)]["video"].shape[:3] for i in order]
  native = [pipeline.plan_shape(*s, patch=PATCH, tokens_per_row=1 << 30, max_area=MAX_AREA,
                                max_frames=MAX_FRAMES, min_side=MIN_SIDE) for s in shapes]
  fitted = [pipeline.plan_shape(*s, patch=PATCH, tokens_per_row=L, max_area=MAX_AREA,
                                max_frames=MAX_FRAMES, min_side=MIN_SIDE) for s in shapes]
  native_tokens = np.array([_tokens(s) for s in native])
  fitted_tokens = np.array([_tokens(s) for s in fitted])
  real, kept = fitted_tokens.sum(), fitted_tokens.sum() / native_tokens.sum()
  results = []
  for label, open_rows, buffer in [("packing: best-fit, buffer 32, 8 open rows (default)", 8, 32),
                                   ("packing: best-fit, buffer 64, 8 open rows", 8, 64),
                                   ("packing: best-fit, no buffer, 4 open rows", 4, 0)]:
    rows, most = _pack(fitted_tokens, L, K, open_rows, buffer)
    results.append((label, real / (rows * L), kept, 1, f"{rows} rows, <= {most} clips a row"))
  results.append(("pad each clip to L", real / (len(fitted_tokens) * L), kept, 1, f"{len(fitted_tokens)} rows"))
  largest = int(native_tokens.max())
  results.append((f"pad each clip to the largest ({largest} tokens, no fit rule)",
                  native_tokens.mean() / largest, 1.0, 1, f"{len(native_tokens)} rows"))
  buckets = {}
  for shape in native:
    buckets.setdefault(_bucket(*shape), []).append(shape)
  computed = bucket_real = 0
  for bucket, members in buckets.items():
    per_batch = max(1, (B * L) // _tokens(bucket))
    batches = -(-len(members) // per_batch)
    computed += batches * per_batch * _tokens(bucket)
    bucket_real += len(members) * _tokens(bucket)
  bucket_kept = bucket_real / native_tokens.sum()
  results.append(("Open-Sora-style buckets", bucket_real / computed, bucket_kept, len(buckets),
                  f"{len(buckets)} buckets, {sum(len(m) < (B * L) // _tokens(k) for k, m in buckets.items())} "
                  "of them with fewer clips than one batch"))
  return results, native_tokens


def throughput(data_dir, L, K, B, batches, workers):
  config = _config(data_dir, L, K, B, workers)
  iterator = iter(pipeline.make_dataset(config, split="train", seed=0))
  try:
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    real = 0
    start = time.perf_counter()
    for _ in range(batches):
      real += packing.batch_stats(next(iterator))["real_tokens"]
    seconds = time.perf_counter() - start
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return dict(workers=workers, first_batch_s=first, batches_per_s=batches / seconds,
              tokens_per_s=real / seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--tokens_per_row", type=int, default=4096)
  parser.add_argument("--examples_per_row", type=int, default=32)
  parser.add_argument("--rows", type=int, default=4, help="rows per batch")
  parser.add_argument("--batches", type=int, default=20, help="batches timed per worker setting")
  args = parser.parse_args()
  L, K, B = args.tokens_per_row, args.examples_per_row, args.rows
  sources.ensure_dataset("moving_digits", args.data_dir)
  results, native_tokens = compare(args.data_dir, L, K, B)
  print(f"\nmoving_digits train, {len(native_tokens)} clips, patch {PATCH}, max_area {MAX_AREA}, "
        f"<= {MAX_FRAMES} frames; tokens per clip: mean {native_tokens.mean():.0f}, min "
        f"{native_tokens.min()}, max {native_tokens.max()}; L = {L}, K = {K}, {B} rows a batch\n")
  print("| strategy | efficiency | tokens kept | batch shapes | notes |")
  print("| --- | --- | --- | --- | --- |")
  for label, efficiency, kept, shapes, notes in results:
    print(f"| {label} | {efficiency:.4f} | {kept:.3f} | {shapes} | {notes} |")
  print("\n| pipeline | first batch (s) | batches/s | real tokens/s |")
  print("| --- | --- | --- | --- |")
  for workers in (0, 2):
    r = throughput(args.data_dir, L, K, B, args.batches, workers)
    print(f"| {workers} workers | {r['first_batch_s']:.2f} | {r['batches_per_s']:.2f} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
  main()
