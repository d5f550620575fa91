"""Train-step throughput of a config on several device counts, measured in one run.

  python benchmarks/train_throughput.py --config=configs/dit_image.py:smoke --devices=1,8 --steps=50

Each device count runs in its own process (XLA_FLAGS fixes the number of CPU
devices at start-up) on the config's mesh (-1 = all devices). Batches come from
the real Grain pipeline and are prefetched, so the numbers are the jitted step
alone (compile time excluded). Prints a markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def measure(config_spec: str, steps: int, overrides) -> dict:
  import jax
  import numpy as np

  from diffusion_jax import config as config_lib
  from diffusion_jax import sharding
  from diffusion_jax.data import pipeline, sources
  from diffusion_jax.train import loop

  config = config_lib.load_config(config_spec)
  config_lib.apply_overrides(config, overrides)
  loop.validate(config, num_devices=jax.device_count())
  sources.ensure_dataset(config.data.name, config.data.data_dir, **pipeline.builder_kwargs(config.data))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  model, optimizer, init_fn, _, state_shardings = loop.build_state(config, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = loop.jit_train_step(config, model, optimizer, mesh, state_shardings)
  it = iter(pipeline.make_dataset(config, split=config.data.split, seed=0))
  local = [next(it) for _ in range(8)]
  batches = [pipeline.make_global_batch(b, batch_sharding) for b in local]
  state = init_fn(jax.random.PRNGKey(0))
  with sharding.activate(mesh, rules):
    compile_start = time.perf_counter()
    state, aux = step_fn(state, batches[0])
    jax.block_until_ready(aux)
    compile_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    for i in range(steps):
      state, aux = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready((state, aux))
    seconds = time.perf_counter() - start
  tokens = float(np.mean([np.sum(b["segment_ids"] > 0) for b in local]))
  examples = float(np.mean([np.sum(b["example_ids"] >= 0) for b in local]))
  return dict(devices=jax.device_count(), mesh=str(dict(mesh.shape)), steps_per_s=steps / seconds,
              examples_per_s=steps * examples / seconds, tokens_per_s=steps * tokens / seconds,
              first_step_s=compile_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/dit_image.py:smoke")
  parser.add_argument("--devices", default="1,8")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args, overrides = parser.parse_known_args()
  overrides = [o[len("--config."):] for o in overrides if o.startswith("--config.")]
  if args.child:
    print(json.dumps(measure(args.config, args.steps, overrides)))
    return
  rows = []
  for n in [int(d) for d in args.devices.split(",")]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--child", f"--config={args.config}", f"--steps={args.steps}"]
    cmd += [f"--config.{o}" for o in overrides]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
  print(f"config {args.config} {' '.join(overrides)}, {args.steps} timed steps\n")
  print("| devices | mesh | steps/s | examples/s | tokens/s | first step (compile) s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['devices']} | {r['mesh']} | {r['steps_per_s']:.2f} | {r['examples_per_s']:.1f} | "
          f"{r['tokens_per_s']:.0f} | {r['first_step_s']:.1f} |")


if __name__ == "__main__":
  main()
