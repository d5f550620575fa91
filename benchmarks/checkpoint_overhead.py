"""How long an async checkpoint save holds up the training loop, against a train step.

  python benchmarks/checkpoint_overhead.py --config=configs/dit_image.py:quickstart --saves=5

Runs the loop's own pieces (state, jitted step, Grain iterator, Orbax manager
from diffusion_jax.checkpoint) and measures, in milliseconds:
  step            a train step with no save in flight (mean over --steps);
  save blocks     how long `checkpoint.save` keeps the loop waiting (the
                  device-to-host copy and the launch of the background write);
  step in save    a train step while that background write runs;
  save to commit  a save alone, from its start until it is committed (what a
                  synchronous save would block for).
Medians over --saves saves of each kind, each into a new step directory. Prints a markdown table.
"""
import argparse
import os
import statistics
import tempfile
import time


def measure(config_spec: str, overrides, steps: int, saves: int, steps_during_save: int) -> dict:
  import jax
  import numpy as np

  from diffusion_jax import checkpoint, sharding
  from diffusion_jax import config as config_lib
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
  data_iter = iter(pipeline.make_dataset(config, split=config.data.split, seed=0))
  batches = [pipeline.make_global_batch(next(data_iter), batch_sharding) for _ in range(8)]
  state = init_fn(jax.random.PRNGKey(0))
  state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))

  step_count = 0

  def run(n):
    nonlocal state, step_count
    start = time.perf_counter()
    with sharding.activate(mesh, rules):
      for _ in range(n):
        state, aux = step_fn(state, batches[step_count % len(batches)])
        step_count += 1
    jax.block_until_ready((state, aux))
    return (time.perf_counter() - start) / n

  run(1)  # compile
  step_s = run(steps)
  blocks, in_save, commits = [], [], []
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.make_manager(workdir, keep=2)
    for _ in range(saves + 1):  # the first save pays one-time setup: left out
      run(2)
      start = time.perf_counter()
      checkpoint.save(manager, step_count, state, loop._IteratorSnapshot(data_iter), config)
      blocks.append(time.perf_counter() - start)
      in_save.append(run(steps_during_save))
      manager.wait_until_finished()
    for _ in range(saves):  # alone, start to commit
      run(1)
      start = time.perf_counter()
      checkpoint.save(manager, step_count, state, loop._IteratorSnapshot(data_iter), config)
      manager.wait_until_finished()
      commits.append(time.perf_counter() - start)
    manager.close()
  blocks, in_save = blocks[1:], in_save[1:]
  return dict(config=f"{config_spec} {' '.join(overrides)}".strip(), devices=jax.device_count(),
              params=sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params)),
              state_mb=state_bytes / 2**20, step_ms=1e3 * step_s, block_ms=1e3 * statistics.median(blocks),
              step_in_save_ms=1e3 * statistics.median(in_save), commit_ms=1e3 * statistics.median(commits),
              saves=saves)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/dit_image.py:quickstart")
  parser.add_argument("--steps", type=int, default=20, help="timed steps without a save")
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--steps-during-save", dest="steps_during_save", type=int, default=3)
  args, rest = parser.parse_known_args()
  overrides = [o[len("--config."):] for o in rest if o.startswith("--config.")]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  r = measure(args.config, overrides, args.steps, args.saves, args.steps_during_save)
  print(f"config {r['config']}: {r['params'] / 1e6:.2f}M params, state {r['state_mb']:.1f} MiB "
        f"(params, Adam moments, EMA), {r['devices']} device(s), median of {r['saves']} saves\n")
  print("| step ms | save blocks the loop ms | step during save ms | save to commit ms | blocking / step |")
  print("|---|---|---|---|---|")
  print(f"| {r['step_ms']:.1f} | {r['block_ms']:.1f} | {r['step_in_save_ms']:.1f} | {r['commit_ms']:.0f} | "
        f"{r['block_ms'] / r['step_ms']:.2f} |")


if __name__ == "__main__":
  main()
