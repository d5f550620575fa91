"""What the sha256 seal of a checkpoint costs, against the Orbax save and restore it sits between.

  python benchmarks/checkpoint_seal.py --gib=0.5

A train state of --gib GiB of float32 (params, EMA, Adam mu and nu; 0.5 GiB is
DiT-S/2's 33M params with AdamW and EMA), random values (incompressible, as
trained weights are to zstd), saved through diffusion_jax.checkpoint's manager.
Prints the checkpoint size and the seconds of: the Orbax save (to commit),
checkpoint.seal (wall and CPU), checkpoint.verify, and the Orbax restore.
"""
import argparse
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax import checkpoint


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--gib", type=float, default=0.5)
  parser.add_argument("--workdir", default="", help="default: a temporary local directory")
  args = parser.parse_args()
  per_leaf = int(args.gib * 2**30 / 4 / 4 / 8)  # float32, 4 copies of 8 leaves
  rng = np.random.default_rng(0)
  params = {f"w{i}": jnp.asarray(rng.standard_normal(per_leaf, dtype=np.float32)) for i in range(8)}
  state = dict(params=params, ema=jax.tree_util.tree_map(lambda x: x + 1, params),
               mu=jax.tree_util.tree_map(lambda x: x * 0.1, params), nu=jax.tree_util.tree_map(jnp.square, params))
  workdir = args.workdir or tempfile.mkdtemp(prefix="seal_bench_")
  manager = checkpoint.make_manager(workdir, keep=2)
  try:
    start = time.time()
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    save_s = time.time() - start
    step_dir = checkpoint.step_dir(manager, 1)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs) \
        if not args.workdir.startswith("gs://") else 0
    start, cpu = time.time(), time.process_time()
    checkpoint.seal(manager)
    seal_s, seal_cpu = time.time() - start, time.process_time() - cpu
    start = time.time()
    assert checkpoint.verify(manager, 1)
    verify_s = time.time() - start
    start = time.time()
    manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))
    restore_s = time.time() - start
  finally:
    manager.close()
    if not args.workdir:
      shutil.rmtree(workdir)
  print(f"checkpoint {size / 2**30:.2f} GiB: Orbax save {save_s:.1f} s, seal {seal_s:.1f} s "
        f"({seal_cpu:.1f} s CPU), verify {verify_s:.1f} s, Orbax restore {restore_s:.1f} s")


if __name__ == "__main__":
  main()
