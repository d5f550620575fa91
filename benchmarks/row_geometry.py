"""Packed-row geometry of a DiT recipe on its real data: tokens per row L, rows per batch B, caption
tokens per row Lt and clips per row K against the real (non-padding) tokens trained per second.

  python benchmarks/row_geometry.py --config=configs/video_dit.py:quickstart,data=<latents>,channels=8 \
      --geometries=256x8x256x16,96x20x64x6 --steps=30

Attention is dense over a row and masked by segment, so a row of L tokens costs ~L^2 per layer
however many clips it holds: shorter rows waste less on masked pairs, until clips no longer fit or
the caption budget Lt leaves rows part-empty. Per geometry this prints the packing fill of tokens
and caption tokens, the host's time to build a batch (the Grain pipeline, single-threaded Python)
and the jitted train step's time on batches of that data (host time excluded: the loop overlaps
the two).
"""
import argparse
import time

import jax
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import sharding
from diffusion_jax.data import encoded, pipeline
from diffusion_jax.train import dit_task, loop


def measure(config, steps: int) -> dict:
  encoded.record_conditioners(config)
  data_iter = iter(dit_task.make_dataset(config, split="train", seed=0))
  local = [next(data_iter) for _ in range(8)]
  start = time.perf_counter()
  for _ in range(10):
    next(data_iter)
  host_s = (time.perf_counter() - start) / 10
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config.mesh)
  model, optimizer, init_fn, _, state_shardings = loop.build_state(config, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  batches = [pipeline.make_global_batch(b, batch_sharding) for b in local[:4]]
  state = init_fn(jax.random.PRNGKey(0))
  with sharding.activate(mesh, rules):
    step = loop.jit_train_step(config, model, optimizer, mesh, state_shardings).lower(state, batches[0]).compile()
    for i in range(3):
      state, _ = step(state, batches[i % 4])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
      state, _ = step(state, batches[i % 4])
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - start) / steps
  real = float(np.mean([np.count_nonzero(b["segment_ids"]) for b in local]))
  text_fill = float(np.mean([np.mean(b["text_segment_ids"] > 0) for b in local])) if "text_segment_ids" in local[0] else 0.0
  return dict(fill=float(np.mean([np.mean(b["segment_ids"] > 0) for b in local])), text_fill=text_fill,
              real_tokens=real, host_ms=host_s * 1e3, step_ms=step_s * 1e3, real_tokens_per_s=real / step_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--geometries", default="256x8x256x16,128x16x80x8,96x20x64x6",
                      help="comma-separated LxBxLtxK: tokens per row, rows, caption tokens per row, clips per row")
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s), jax {jax.__version__}")
  print("| L | B | Lt | K | token fill | caption fill | real tokens/step | host ms/batch | step ms | real tokens/s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for geometry in args.geometries.split(","):
    length, rows, text_length, clips = (int(x) for x in geometry.split("x"))
    config = config_lib.load_config(args.config)
    config.data.update(tokens_per_row=length, text_tokens_per_row=text_length, examples_per_row=clips)
    config.train.global_batch = rows
    r = measure(config, args.steps)
    print(f"| {length} | {rows} | {text_length} | {clips} | {r['fill']:.3f} | {r['text_fill']:.3f} | "
          f"{r['real_tokens']:.0f} | {r['host_ms']:.0f} | {r['step_ms']:.0f} | {r['real_tokens_per_s']:.0f} |",
          flush=True)


if __name__ == "__main__":
  main()
