"""Our DiT train step against the reference PyTorch DiT, same shapes, same machine, one run.

  pip install torch torchvision timm   # benchmark-only; never a runtime dependency
  git clone https://github.com/facebookresearch/DiT /tmp/DiT
  python benchmarks/vs_reference.py --reference=/tmp/DiT --threads=2

The reference step is DiT's own train.py step: `models.py` (DiT with adaLN-Zero,
learned sigma), `diffusion.create_diffusion("")` training_losses (the hybrid
MSE + VLB loss over 1000 linear-beta steps), AdamW (lr 1e-4, no weight decay),
then the EMA update. Ours is `train.loop`'s jitted train step of
configs/dit_image.py on the same latent shape (eps prediction, learned sigma,
DDPM linear schedule, AdamW, EMA, grad clipping). Both fp32, on `--threads`
CPU threads (torch.set_num_threads; XLA's CPU thread pool is the process's
cores, so run under `taskset` to compare on fewer cores). Shapes:
  S/2   DiT-S/2 on 32x32x4 latents (256 tokens), batch 8
  tiny  4 layers x 128 wide, patch 2, 32x32x4 (256 tokens), batch 8
The two steps alternate, one each in turn (this host's speed drifts minute to
minute; alternating gives both the same minutes). Prints each median step
time, their ratio, the median of the per-step ratios (ours over the reference
step right after it), the model FLOP/s (the analytic count of
metrics.dit_train_flops, the same for both), and which
malloc the process runs on: both steps share it. `--matmuls` then times the
step's own matmul shapes alone, XLA's kernel (a jitted jnp.dot) against
PyTorch's (torch.mm), in turn with a pause between: the floor under the step
ratio that no change to our step can move. XLA's CPU runtime mallocs a
scratch buffer every step (159 MB for the tiny shape); glibc maps and unmaps
blocks that big each time and the step page-faults them back in, tcmalloc
keeps them. `python -m diffusion_jax` preloads tcmalloc where it is installed;
for this script, preload it yourself to measure that setting:
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/vs_reference.py ...
"""
import argparse
import importlib
import resource
import statistics
import sys
import time

import numpy as np

SHAPES = {
    "S/2": dict(depth=12, width=384, num_heads=6, patch=2),
    "tiny": dict(depth=4, width=128, num_heads=4, patch=2),
}
LATENT = (4, 32, 32)  # (C, H, W)
NUM_CLASSES = 10


def our_step(variant: str, batch: int, overrides):
  """One of our train steps on a fixed batch, as a function that runs it to completion."""
  import jax

  from diffusion_jax import config as config_lib
  from diffusion_jax import patches, sharding
  from diffusion_jax.train import dit_task, loop

  config = config_lib.load_config(f"configs/dit_image.py:variant={variant}")
  channels, size, _ = LATENT
  config.data.update(image_size=size, channels=channels, tokens_per_row=(size // 2) ** 2, examples_per_row=1)
  config.train.update(global_batch=batch, lr=1e-4, weight_decay=0.0)
  config.model.num_classes = NUM_CLASSES
  config_lib.apply_overrides(config, overrides)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config.mesh)
  model, optimizer, init_fn, _, state_shardings = loop.build_state(config, mesh, rules)
  step_fn = loop.jit_train_step(config, model, optimizer, mesh, state_shardings)
  rows = dit_task.dummy_batch(config, batch)
  rng = np.random.default_rng(0)
  rows["patches"] = rng.normal(size=rows["patches"].shape).astype(np.float32)
  grid = (1, size // 2, size // 2)
  rows["positions"][:] = patches.grid_positions(grid)
  rows["grid"][:] = grid
  rows["labels"] = rng.integers(0, NUM_CLASSES, rows["labels"].shape).astype(np.int32)
  rows = jax.device_put(rows, sharding.batch_sharding(mesh))
  state = init_fn(jax.random.PRNGKey(0))

  def step():
    nonlocal state
    with sharding.activate(mesh, rules):
      state, aux = step_fn(state, rows)
      jax.block_until_ready((state, aux))
  return step


def reference_step(reference: str, variant: str, batch: int, threads: int):
  """One step of DiT's train.py, as a function that runs it to completion."""
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  sys.path.insert(0, reference)
  models = importlib.import_module("models")
  diffusion_lib = importlib.import_module("diffusion")
  shape = SHAPES[variant]
  channels, size, _ = LATENT
  model = models.DiT(input_size=size, patch_size=shape["patch"], in_channels=channels, hidden_size=shape["width"],
                     depth=shape["depth"], num_heads=shape["num_heads"], num_classes=NUM_CLASSES)
  ema = models.DiT(input_size=size, patch_size=shape["patch"], in_channels=channels, hidden_size=shape["width"],
                   depth=shape["depth"], num_heads=shape["num_heads"], num_classes=NUM_CLASSES)
  ema.load_state_dict(model.state_dict())
  ema.requires_grad_(False)
  diffusion = diffusion_lib.create_diffusion(timestep_respacing="")
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
  model.train()
  x = torch.randn(batch, channels, size, size)
  y = torch.randint(0, NUM_CLASSES, (batch,))

  def step():
    t = torch.randint(0, diffusion.num_timesteps, (batch,))
    loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():  # DiT's update_ema
      for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)

  sys.path.remove(reference)
  for name in [m for m in sys.modules if m == "models" or m == "diffusion" or m.startswith("diffusion.")]:
    del sys.modules[name]  # the reference's `diffusion` package must not shadow anything later
  return step


def alternate(ours, reference, steps: int):
  """Step times (s) of both, one step each in turn after two warm-up steps each (ours compiles in
  its first): on a host whose speed drifts minute to minute, both see the same minutes."""
  for _ in range(2):
    ours(), reference()
  our_times, reference_times, faults = [], [], 0
  for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    ours()
    our_times.append(time.perf_counter() - start)
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    start = time.perf_counter()
    reference()
    reference_times.append(time.perf_counter() - start)
  return our_times, reference_times, faults / steps


def matmul_shapes(variant: str, batch: int) -> list[tuple[str, tuple[int, int, int]]]:
  """(name, (M, K, N)) of the matmuls a step of this shape runs, per layer: the MLP's two forward
  products (fc2's is also the shape of fc1's input gradient), fc1's weight gradient, and the
  attention's q/k/v and output projections."""
  shape = SHAPES[variant]
  _, size, _ = LATENT
  rows, width = batch * (size // shape["patch"]) ** 2, shape["width"]
  return [("mlp fc1", (rows, width, 4 * width)), ("mlp fc2", (rows, 4 * width, width)),
          ("fc1 weight gradient", (width, rows, 4 * width)), ("q/k/v, proj", (rows, width, width))]


def time_matmuls(variant: str, batch: int, threads: int, repeats: int = 15, calls: int = 20):
  """Median seconds a call of each shape of matmul_shapes, XLA's kernel and PyTorch's in turn.

  Each sample is `calls` calls in a row after one untimed call, and 50 ms of sleep come before
  each: PyTorch's OpenMP threads spin for milliseconds after a parallel region, and on 2 cores
  that time is taken from whichever product runs next (XLA's ran at ~60% of its speed without
  the pause in one run here); the untimed call wakes the sampled side's threads again."""
  import jax
  import jax.numpy as jnp
  import torch

  torch.set_num_threads(threads)
  rows = []
  for name, (m, k, n) in matmul_shapes(variant, batch):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    ours = jax.jit(jnp.dot).lower(a, b).compile()
    a_jax, b_jax = jax.device_put(a), jax.device_put(b)
    a_torch, b_torch = torch.from_numpy(a), torch.from_numpy(b)
    samples = {"ours": [], "reference": []}
    for _ in range(repeats):
      for side, product in (("ours", lambda: ours(a_jax, b_jax)), ("reference", lambda: torch.mm(a_torch, b_torch))):
        time.sleep(0.05)
        product()
        start = time.perf_counter()
        for _ in range(calls):  # XLA's dispatch is asynchronous: its calls queue, the wait is for the last
          out = product()
        if side == "ours":
          out.block_until_ready()
        samples[side].append((time.perf_counter() - start) / calls)
    rows.append((name, (m, k, n), statistics.median(samples["ours"]), statistics.median(samples["reference"])))
  return rows


def model_flops(variant: str, batch: int) -> float:
  from diffusion_jax import metrics

  shape = SHAPES[variant]
  channels, size, _ = LATENT
  tokens = (size // shape["patch"]) ** 2
  return metrics.dit_train_flops(width=shape["width"], depth=shape["depth"],
                                 patch_dim=shape["patch"] ** 2 * channels, out_dim=2 * shape["patch"] ** 2 * channels,
                                 segment_lengths=[[tokens]] * batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", required=True, help="a clone of facebookresearch/DiT (holds models.py)")
  parser.add_argument("--variants", default="S/2,tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--matmuls", action="store_true", help="also time the steps' matmul shapes alone")
  parser.add_argument("overrides", nargs="*", help="--config.a.b=value overrides of our config")
  args, overrides = parser.parse_known_args()
  with open("/proc/self/maps") as maps:  # Linux; which malloc both steps run on
    allocator = "tcmalloc" if "tcmalloc" in maps.read() else "the system's malloc"
  print(f"malloc: {allocator}", flush=True)
  print("| shape | ours s/step | reference s/step | ours / reference | median of per-step ratios | "
        "model GFLOP/step | ours GFLOP/s | reference GFLOP/s |")
  print("|---|---|---|---|---|---|---|---|")
  for variant in args.variants.split(","):
    our_times, reference_times, faults = alternate(
        our_step(variant, args.batch, overrides + args.overrides),
        reference_step(args.reference, variant, args.batch, args.threads), args.steps)
    ours, ref = statistics.median(our_times), statistics.median(reference_times)
    pair_ratio = statistics.median(o / r for o, r in zip(our_times, reference_times))
    flops = model_flops(variant, args.batch)
    print(f"{variant}: ours page-faulted {faults:.0f} pages a step", flush=True)
    print(f"| {variant} b{args.batch} | {ours:.3f} | {ref:.3f} | {ours / ref:.2f} | {pair_ratio:.2f} | "
          f"{flops / 1e9:.1f} | {flops / ours / 1e9:.1f} | {flops / ref / 1e9:.1f} |", flush=True)
  if args.matmuls:
    print("\n| shape | matmul | M x K x N | XLA ms | PyTorch ms | XLA / PyTorch | XLA GFLOP/s | PyTorch GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
      for name, (m, k, n), ours, ref in time_matmuls(variant, args.batch, args.threads):
        flops = 2 * m * k * n
        print(f"| {variant} | {name} | {m} x {k} x {n} | {1e3 * ours:.2f} | {1e3 * ref:.2f} | {ours / ref:.2f} | "
              f"{flops / ours / 1e9:.0f} | {flops / ref / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
  main()
