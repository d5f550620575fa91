"""Resume on another process count through the command: `python -m diffusion_jax train` under
launch/local.py, 2 processes -> 1 -> 2 on one workdir.

Each resumed step is recomputed here, in the test process, from what the rule of
distributed.resume_data_iterator says the run must do (the saved state, restored onto
the new mesh, and each new process's shard advanced by the steps already taken): the
CLI's logged loss at that step must be that loss, so a run that re-initialised, lost
its state or read other batches fails.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from diffusion_jax import checkpoint, sharding
from diffusion_jax import config as config_lib
from diffusion_jax.data import pipeline
from diffusion_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "dit_image.py") + ":smoke"
LAUNCHER = os.path.join(REPO, "launch", "local.py")
DEVICES = 2  # per process: 2 x 2 devices, then 1 x 2, then 2 x 2


def _overrides(data_dir, steps):
  return (f"data.data_dir={data_dir}", f"train.steps={steps}", "train.ckpt_every=2", "train.log_every=1",
          "train.eval_every=0")


def _train_through_cli(workdir, data_dir, *, processes, steps):
  cmd = [sys.executable, LAUNCHER, f"--processes={processes}", f"--devices={DEVICES}", "--init-timeout=60",
         "--timeout=240", "--", sys.executable, "-m", "diffusion_jax", "train", f"--config={CONFIG}",
         f"--workdir={workdir}", *(f"--config.{o}" for o in _overrides(data_dir, steps))]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  return result.stdout


def _logged_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(row["step"], row["loss"]) for row in map(json.loads, f) if "loss" in row]


class _Shards:
  """The global batch of `count` processes in one: each process's shard, advanced `skip` batches."""

  def __init__(self, config, count, skip):
    self.iterators = [iter(pipeline.make_dataset(config, split=config.data.split, process_index=i,
                                                 process_count=count, seed=config.data.shuffle_seed))
                      for i in range(count)]
    for it in self.iterators:
      for _ in range(skip):
        next(it)

  def next_global(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _expected_loss(config, workdir, *, from_step, processes):
  """The loss of step from_step + 1 of a run resumed from checkpoint from_step on `processes`
  processes x DEVICES devices, computed in this process on processes x DEVICES of its devices."""
  devices = jax.devices()[:processes * DEVICES]
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  model, optimizer, _, abstract, shardings = loop.build_state(config, mesh, rules)
  manager = checkpoint.make_manager(str(workdir), keep=3, create=False)
  state = checkpoint.restore(manager, from_step, checkpoint.abstract_with_shardings(abstract, shardings))
  manager.close()
  local = _Shards(config, processes, from_step).next_global()
  batch = pipeline.make_global_batch(local, sharding.batch_sharding(mesh))
  step = loop.jit_train_step(config, model, optimizer, mesh, shardings)
  with sharding.activate(mesh, rules):
    _, aux = step(state, batch)
  return float(jax.device_get(aux["loss"]))


def test_train_resumes_two_processes_then_one_then_two(data_dir, tmp_path):
  workdir = tmp_path / "run"
  config = config_lib.load_config(CONFIG)
  config_lib.apply_overrides(config, _overrides(data_dir, 6))

  first = _train_through_cli(workdir, data_dir, processes=2, steps=2)
  assert "resumed" not in first
  second = _train_through_cli(workdir, data_dir, processes=1, steps=4)
  assert f"resumed from step 2 in {workdir} on 1 processes (data iterator skipped)" in second
  third = _train_through_cli(workdir, data_dir, processes=2, steps=6)
  assert f"resumed from step 4 in {workdir} on 2 processes (data iterator skipped)" in third

  losses = _logged_losses(workdir)
  assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]  # one curve, no step twice or missing
  assert all(np.isfinite(loss) for _, loss in losses)
  logged = dict(losses)
  np.testing.assert_allclose(logged[3], _expected_loss(config, workdir, from_step=2, processes=1), rtol=1e-4)
  np.testing.assert_allclose(logged[5], _expected_loss(config, workdir, from_step=4, processes=2), rtol=1e-4)
  # The newest checkpoint holds the 2-process run's iterator states.
  data_item = workdir / "checkpoints" / "6" / "data"
  assert sorted(f for f in os.listdir(data_item) if f.endswith(".json")) == \
      ["process_0-of-2.json", "process_1-of-2.json"]
