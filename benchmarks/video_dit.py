"""Video DiT speed in one run: train-step tokens/s and FLOP/s against the machine's fp32 matmul
peak, attention backends side by side, and one sampling step against one forward pass.

  python benchmarks/video_dit.py --variants=tiny,S/2 --backends=xla,gpu --steps=10

The packed rows are synthetic but shaped like the real data (several clips of
different sizes per row, captions of 10-20 tokens, a few padding tokens), so
time and FLOPs depend on shapes only. FLOPs come from XLA's cost analysis of
the compiled step (metrics.step_flops); the peak is a large fp32 matmul timed
on the same devices (metrics.measure_cpu_peak_flops). The sampling step is
dit_task.generate with one Euler step and CFG (two model calls in one batch),
divided by two, against model.apply on the same rows.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import metrics, patches, sharding
from diffusion_jax.data import packing
from diffusion_jax.train import dit_task, loop


def packed_rows(rows: int, length: int, k: int, text_len: int, patch_dim: int, text_dim: int, seed: int = 0) -> dict:
  """Rows of whole synthetic clips (grids of 1-3 frames x 2-6 x 2-6 patches) packed to `length` tokens."""
  rng = np.random.default_rng(seed)
  examples = []
  while len(examples) < rows * k:
    grid = (int(rng.integers(1, 4)), int(rng.integers(2, 7)), int(rng.integers(2, 7)))
    n = int(np.prod(grid))
    examples.append(dict(patches=rng.normal(size=(n, patch_dim)).astype(np.float32),
                         positions=patches.grid_positions(grid), grid=np.asarray(grid, np.int32),
                         id=len(examples), label=0, caption="",
                         text=rng.normal(size=(int(rng.integers(10, 21)), text_dim)).astype(np.float32)))
  packed = packing.pack_examples(examples, length, k, text_tokens_per_row=text_len)[:rows]
  return {key: np.stack([r[key] for r in packed]) for key in packed[0] if key not in packing.HOST_KEYS}


def make_config(variant: str, backend: str, rows: int, length: int, k: int) -> ml_collections.ConfigDict:
  from diffusion_jax import config as config_lib

  config = config_lib.load_config(f"configs/video_dit.py:variant={variant},channels=4,text")
  config.data.update(tokens_per_row=length, examples_per_row=k, text_tokens_per_row=k * 32)
  config.model.attention_backend = backend
  config.train.update(global_batch=rows, compute_dtype="float32")
  config.mesh.shape = (-1, 1, 1)
  return config


def measure(variant: str, backend: str, rows: int, length: int, k: int, steps: int) -> dict:
  config = make_config(variant, backend, rows, length, k)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config.mesh)
  model, optimizer, init_fn, _, state_shardings = loop.build_state(config, mesh, rules)
  step_fn = loop.jit_train_step(config, model, optimizer, mesh, state_shardings)
  batch = packed_rows(rows, length, k, k * 32, dit_task.patch_dim(config), 384)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  state = init_fn(jax.random.PRNGKey(0))
  with sharding.activate(mesh, rules):
    compiled = step_fn.lower(state, batch).compile()
    flops = metrics.step_flops(compiled, mesh.size)
    state, aux = compiled(state, batch)
    jax.block_until_ready(aux)
    start = time.perf_counter()
    for _ in range(steps):
      state, aux = compiled(state, batch)
    jax.block_until_ready((state, aux))
    step_s = (time.perf_counter() - start) / steps

    params = state.ema_params
    forward = jax.jit(lambda p, b: dit_task.apply_model(model, p, b["patches"], jnp.full(b["segment_ids"].shape, 500.0),
                                                        b))
    sample = jax.jit(lambda p, b: dit_task.generate(model, p, config, b, jax.random.PRNGKey(0), sampler="euler",
                                                    steps=1, cfg_scale=4.0))
    timings = {}
    for name, fn in (("forward", forward), ("sample_step", sample)):
      jax.block_until_ready(fn(params, batch))
      start = time.perf_counter()
      for _ in range(steps):
        out = fn(params, batch)
      jax.block_until_ready(out)
      timings[name] = (time.perf_counter() - start) / steps
  tokens = float(np.sum(np.asarray(batch["segment_ids"]) > 0))
  return dict(variant=variant, backend=backend, tokens=tokens, step_s=step_s, tokens_per_s=tokens / step_s,
              flops_per_step=flops, flops_per_s=(flops or 0) / step_s,
              sample_vs_forward=timings["sample_step"] / 2 / timings["forward"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default="tiny,S/2")
  parser.add_argument("--backends", default="xla,gpu")
  parser.add_argument("--rows", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--examples-per-row", type=int, default=16)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  peak = metrics.measure_cpu_peak_flops() if jax.default_backend() == "cpu" else None
  device = jax.devices()[0]
  print(f"{device.platform} {device.device_kind}, {jax.device_count()} device(s); fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s" if peak else f"{device.platform} {device.device_kind}")
  print(f"{args.rows} rows x {args.length} tokens, <= {args.examples_per_row} clips a row, captions 10-20 tokens\n")
  print("| variant | attention | real tokens/step | step ms | tokens/s | GFLOP/step | GFLOP/s | % of fp32 peak | "
        "sampling step / forward |")
  print("|---|---|---|---|---|---|---|---|---|")
  for variant in args.variants.split(","):
    for backend in args.backends.split(","):
      r = measure(variant, backend, args.rows, args.length, args.examples_per_row, args.steps)
      share = f"{100 * r['flops_per_s'] / peak:.0f}%" if peak else "n/a"
      print(f"| {variant} | {backend} | {r['tokens']:.0f} | {1e3 * r['step_s']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{(r['flops_per_step'] or 0) / 1e9:.2f} | {r['flops_per_s'] / 1e9:.1f} | {share} | "
            f"{r['sample_vs_forward']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
