"""Rematerialisation trade-off: the train step with model.remat none / full / dots.

  python benchmarks/remat.py --config=configs/dit_image.py:variant=S/2 --steps=3 --config.train.global_batch=8

For each policy the step is compiled once (loop.make_train_step, the loop's
own step) and XLA's memory analysis of the compiled program gives its
temporary buffer bytes (the activations kept for the backward pass live
there); then `steps` steps are timed after a warm-up step. Batches are
dit_task.dummy_batch zeros: time and memory depend on shapes only, so no
dataset is needed. Prints a markdown table.
"""
import argparse
import time

POLICIES = ("none", "full", "dots")


def measure(config, policy: str, steps: int) -> dict:
  import jax

  from diffusion_jax import sharding
  from diffusion_jax.train import dit_task, loop

  config.model.remat = policy
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  model, optimizer, init_fn, _, state_shardings = loop.build_state(config, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = loop.jit_train_step(config, model, optimizer, mesh, state_shardings)
  batch = jax.device_put(dit_task.dummy_batch(config, config.train.global_batch), batch_sharding)
  state = init_fn(jax.random.PRNGKey(0))
  with sharding.activate(mesh, rules):
    compile_start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - compile_start
    memory = compiled.memory_analysis()
    state, aux = compiled(state, batch)  # warm-up
    jax.block_until_ready(aux)
    start = time.perf_counter()
    for _ in range(steps):
      state, aux = compiled(state, batch)
    jax.block_until_ready((state, aux))
    step_s = (time.perf_counter() - start) / steps
  return dict(policy=policy, step_s=step_s, compile_s=compile_s,
              temp_mib=memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan"),
              argument_mib=memory.argument_size_in_bytes / 2**20 if memory is not None else float("nan"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/dit_image.py:variant=S/2")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--policies", default=",".join(POLICIES))
  args, overrides = parser.parse_known_args()
  overrides = [o[len("--config."):] for o in overrides if o.startswith("--config.")]

  import jax

  from diffusion_jax import config as config_lib
  from diffusion_jax.train import loop

  rows = []
  for policy in args.policies.split(","):
    if policy not in POLICIES:
      raise ValueError(f"unknown remat policy {policy!r}; use {', '.join(POLICIES)}")
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    loop.validate(config, num_devices=jax.device_count())
    rows.append(measure(config, policy, args.steps))
  print(f"config {args.config} {' '.join(overrides)}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {args.steps} timed steps\n")
  print("| remat | step s | temp MiB (memory_analysis) | arguments MiB | compile s |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['policy']} | {r['step_s']:.3f} | {r['temp_mib']:.1f} | {r['argument_mib']:.1f} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
  main()
