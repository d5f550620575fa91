"""Where a compiled train step's time goes: thread time per op, by phase, from a jax.profiler trace.

  python benchmarks/step_profile.py --config=configs/video_dit.py:quickstart,data=quickstart_out/latents,channels=8
  python benchmarks/step_profile.py --config=configs/dit_image.py:smoke --steps=3 --top=20

Traces `--steps` steps of the jitted step on real batches (after a warm-up), sums each XLA op's
time over all threads, and joins the ops with the compiled HLO's op_name metadata to split them
into phases: the model's forward and backward (matmuls and the rest), Muon's Newton-Schulz
products (vmapped over the stacked layers) and the rest of the optimizer. Prints milliseconds of
thread time per step (both cores' time counts, so it sums to ~2x the wall time on 2 cores), then
the top ops. On a busy or noisy host the absolute numbers move; the shares are what to read.
"""
import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
import time


def _phase(op_name: str, is_dot: bool) -> str:
  if "vmap()" in op_name:  # optax.contrib's Newton-Schulz runs under jax.vmap over stacked matrices
    phase = "optimizer: Muon Newton-Schulz"
  elif "transpose(" in op_name:
    phase = "model backward"
  elif "jvp(" in op_name:
    phase = "model forward"
  else:
    phase = "optimizer and the rest"
  return phase + (": matmuls" if is_dot else ": other ops")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/dit_image.py:smoke")
  parser.add_argument("--steps", type=int, default=5, help="steps traced")
  parser.add_argument("--top", type=int, default=25, help="ops listed")
  args = parser.parse_args()

  import jax

  from diffusion_jax import config as config_lib
  from diffusion_jax import sharding
  from diffusion_jax.data import pipeline, sources
  from diffusion_jax.train import loop

  config = config_lib.load_config(args.config)
  loop.validate(config, num_devices=jax.device_count())
  sources.ensure_dataset(config.data.name, config.data.data_dir, **pipeline.builder_kwargs(config.data))
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config.mesh)
  model, optimizer, init_fn, _, state_shardings = loop.build_state(config, mesh, rules)
  step_fn = loop.jit_train_step(config, model, optimizer, mesh, state_shardings)
  it = iter(loop.TASKS[config.task].make_dataset(config, split=config.data.split, process_index=0,
                                                  process_count=1, seed=0))
  batches = [pipeline.make_global_batch(next(it), sharding.batch_sharding(mesh)) for _ in range(8)]
  state = init_fn(jax.random.PRNGKey(0))
  with sharding.activate(mesh, rules):
    compiled = step_fn.lower(state, batches[0]).compile()
    wall = []
    for i in range(10 + args.steps):
      start = time.perf_counter()
      state, aux = compiled(state, batches[i % len(batches)])
      jax.block_until_ready(state)
      wall.append(time.perf_counter() - start)
    trace_dir = tempfile.mkdtemp(prefix="step_profile_")
    jax.profiler.start_trace(trace_dir)
    for i in range(args.steps):
      state, aux = compiled(state, batches[i % len(batches)])
      jax.block_until_ready(state)
    jax.profiler.stop_trace()

  op_names = {}  # HLO instruction -> (shape, op_name)
  for line in compiled.as_text().splitlines():
    match = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", line)
    if match:
      op_names[match.group(1)] = (match.group(2), match.group(3).replace("jit(train_step)/", ""))
  trace_file = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  per_op = collections.Counter()
  for event in json.load(gzip.open(trace_file))["traceEvents"]:
    if event.get("ph") == "X" and event.get("name") in op_names:
      per_op[event["name"]] += event["dur"] / 1e3 / args.steps  # us -> ms per step

  phases = collections.Counter()
  for name, ms in per_op.items():
    phases[_phase(op_names[name][1], "ynn" in name or name.startswith("dot"))] += ms
  total = sum(phases.values())
  print(f"{args.config}: wall {1e3 * statistics.median(wall[10:]):.1f} ms a step (median of {args.steps}, "
        f"untraced); {total:.1f} ms of op thread time a step traced\n")
  print("| phase | thread ms / step | share |\n|---|---:|---:|")
  for phase, ms in sorted(phases.items()):
    print(f"| {phase} | {ms:.1f} | {100 * ms / total:.1f}% |")
  print(f"\n| op | shape | thread ms / step | op_name |\n|---|---|---:|---|")
  for name, ms in per_op.most_common(args.top):
    shape, op_name = op_names[name]
    print(f"| {name} | {shape} | {ms:.2f} | {op_name[:100]} |")


if __name__ == "__main__":
  main()
