"""The training loop on the real stack: sharding, learning, checkpoints, resume, CLI errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import __main__ as cli
from diffusion_jax import checkpoint, malloc, sharding
from diffusion_jax import config as config_lib
from diffusion_jax.data import pipeline
from diffusion_jax.train import dit_task, loop

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "dit_image.py")


def smoke_config(data_dir, *overrides):
  config = config_lib.load_config(CONFIG + ":smoke")
  config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", *overrides])
  return config


def first_batch(config):
  return next(iter(pipeline.make_dataset(config, split=config.data.split, seed=config.data.shuffle_seed)))


def sharded_loss(config, params, batch, devices):
  """The loss of `batch` under `params`, computed on a mesh over `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  model, _, _, _, state_shardings = loop.build_state(config, mesh, rules)
  params = jax.device_put(params, state_shardings.params)  # fails if any sharding is invalid
  global_batch = pipeline.make_global_batch(batch, sharding.batch_sharding(mesh))
  objective = dit_task.make_objective(config)
  fn = jax.jit(lambda p, b: dit_task.loss_fn(p, model, objective, b, jax.random.PRNGKey(7), config, train=False)[0],
               in_shardings=(state_shardings.params, sharding.batch_sharding(mesh)))
  with sharding.activate(mesh, rules):
    return float(fn(params, global_batch)), state_shardings.params


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_loss_on_meshes_equals_one_device(data_dir, shape):
  config = smoke_config(data_dir)
  batch = first_batch(config)
  one = config_lib.from_json(config_lib.to_json(config))
  one.mesh.shape = (1, 1, 1)
  mesh1 = sharding.make_mesh(one.mesh, jax.devices()[:1])
  _, _, init_fn, _, _ = loop.build_state(one, mesh1, sharding.logical_rules(one.mesh))
  params = jax.device_get(init_fn(jax.random.PRNGKey(0)).params)
  # Zero-initialised output layers would make every loss the same: perturb them.
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * np.sin(np.arange(p.size).reshape(p.shape)), params)

  loss1, _ = sharded_loss(one, params, batch, jax.devices()[:1])
  config.mesh.shape = shape
  loss8, shardings = sharded_loss(config, params, batch, jax.devices())
  np.testing.assert_allclose(loss8, loss1, rtol=2e-5)
  if shape[1] > 1 or shape[2] > 1:  # model-parallel meshes really split some parameters
    specs = [s.spec for s in jax.tree_util.tree_leaves(shardings)]
    assert any("fsdp" in jax.tree_util.tree_leaves(tuple(s)) for s in specs)
    if shape[2] > 1:
      assert any("tensor" in jax.tree_util.tree_leaves(tuple(s)) for s in specs)


def fixed_batch_setup(config):
  """(batch, mesh, rules, model, init_fn, mean_loss): mean_loss(params) on one fixed batch."""
  batch = first_batch(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  model, _, init_fn, _, _ = loop.build_state(config, mesh, rules)
  objective = dit_task.make_objective(config)

  @jax.jit
  def mean_loss(params):  # over 8 noise draws, so a comparison is not luck
    keys = jax.random.split(jax.random.PRNGKey(123), 8)
    return jnp.mean(jax.vmap(lambda k: dit_task.loss_fn(params, model, objective, batch, k, config, train=False)[0])(keys))

  return batch, mesh, rules, model, init_fn, mean_loss


def test_smoke_training_lowers_loss_on_a_fixed_batch(data_dir, tmp_path):
  config = smoke_config(data_dir, "train.steps=40", "train.lr=2e-3", "train.ckpt_every=1000")
  _, mesh, rules, _, init_fn, mean_loss = fixed_batch_setup(config)
  with sharding.activate(mesh, rules):
    before = float(mean_loss(init_fn(jax.random.PRNGKey(config.train.seed)).params))
  state, metrics = loop.train(config, str(tmp_path / "run"))
  with sharding.activate(mesh, rules):
    after = float(mean_loss(state.params))
  assert int(state.step) == 40 and np.isfinite(metrics["loss"])
  assert after < 0.8 * before, (before, after)


def _tree_equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_round_trip_and_exact_resume(data_dir, tmp_path):
  overrides = ("train.ckpt_every=6", "train.log_every=3")
  straight, _ = loop.train(smoke_config(data_dir, "train.steps=12", *overrides), str(tmp_path / "a"))
  # Interrupted at step 6, then resumed from the checkpoint to step 12.
  loop.train(smoke_config(data_dir, "train.steps=6", *overrides), str(tmp_path / "b"))
  resumed, _ = loop.train(smoke_config(data_dir, "train.steps=12", *overrides), str(tmp_path / "b"))
  _tree_equal(jax.device_get(straight), jax.device_get(resumed))

  # The step-12 checkpoint restores onto another mesh with the same values,
  # and its data iterator yields the batch an uninterrupted iterator yields next.
  config = smoke_config(data_dir, "train.steps=12", "mesh.shape=(2,2,2)", *overrides)
  mesh = sharding.make_mesh(config.mesh)
  _, _, _, abstract, shardings = loop.build_state(config, mesh, sharding.logical_rules(config.mesh))
  manager = checkpoint.make_manager(str(tmp_path / "a"), keep=3, create=False)
  assert manager.latest_step() == 12
  restored_iter = iter(pipeline.make_dataset(config, split="train", seed=config.data.shuffle_seed))
  restored = checkpoint.restore(manager, 12, checkpoint.abstract_with_shardings(abstract, shardings), restored_iter)
  _tree_equal(jax.device_get(straight), jax.device_get(restored))
  assert restored.params["final_layer"]["linear"]["kernel"].sharding.mesh.shape["fsdp"] == 2
  fresh_iter = iter(pipeline.make_dataset(config, split="train", seed=config.data.shuffle_seed))
  for _ in range(12):
    next(fresh_iter)
  _tree_equal(next(fresh_iter), next(restored_iter))


def _listing(path):
  return sorted((os.path.relpath(os.path.join(d, f), path), os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, files in os.walk(path) for f in files)


def test_cli_user_errors_are_one_line_and_touch_nothing(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  base = ["train", f"--config={CONFIG}:smoke", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
  assert cli.main(base + ["--config.train.steps=2", "--config.train.ckpt_every=2"]) == 0
  before = _listing(workdir)
  capsys.readouterr()

  cases = [
      (base + ["--config.model.variant=tiny"], "holds a checkpoint of a different model: model"),
      (base + ["--config.train.optimizer=muon"], "train.optimizer is 'adamw' there but 'muon'"),
      (base + ["--config.model.variant=Q/3"], "unknown model.variant 'Q/3'"),
      (base + ["--config.train.nope=1"], "no config field 'train.nope'"),
      (["train", "--config=missing.py", f"--workdir={workdir}"], "config file not found: missing.py"),
      (base + [f"--config.data.name={tmp_path}"], str(tmp_path)),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
  assert _listing(workdir) == before


def test_sample_command_writes_grids_and_manifest(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  cli.main(["train", f"--config={CONFIG}:smoke", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--config.train.steps=2", "--config.train.ckpt_every=2"])
  out = str(tmp_path / "samples")
  assert cli.main(["sample", f"--workdir={workdir}", f"--out={out}", "--steps-sample=3", "--per-class=2"]) == 0
  import json

  from PIL import Image
  records = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
  assert [r["cls"] for r in records] == list(range(10))
  assert all(r["sampler"] == "ddim" and r["steps"] == 3 and r["checkpoint_step"] == 2 for r in records)
  grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
  assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0
  for r in records:
    assert os.path.exists(os.path.join(out, r["file"]))


def test_data_stats_command_prints_json(data_dir, capsys):
  import json

  assert cli.main(["data-stats", f"--config={CONFIG}:smoke", f"--config.data.data_dir={data_dir}",
                   "--num-batches=2"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["batches"] == 2 and result["examples"] == 16  # smoke: 8 rows of one 16 px image each
  assert result["packing_efficiency"] == 1.0 and result["frames"] == {"1": 16}


def test_cli_preloads_tcmalloc_on_cpu_hosts(tmp_path, monkeypatch):
  """The command re-runs itself with tcmalloc preloaded on a CPU-only Linux host that has it
  (glibc unmaps XLA's per-step scratch buffer and the next step faults it back in)."""
  monkeypatch.setattr(malloc.sys, "platform", "linux")
  monkeypatch.setattr(malloc, "has_accelerator", lambda environ: False)
  missing, library = str(tmp_path / "missing.so"), tmp_path / "libtcmalloc_minimal.so.4"
  library.write_bytes(b"")
  libraries = (missing, str(library))
  env = malloc.tcmalloc_environment({"LD_PRELOAD": "/other.so", "PATH": "/bin"}, libraries)
  assert env["LD_PRELOAD"] == f"{library}:/other.so" and env["PATH"] == "/bin"
  # Already preloaded (the re-run itself), asked not to, or an accelerator host: run as is.
  assert malloc.tcmalloc_environment(env, libraries) is None
  assert malloc.tcmalloc_environment({"DIFFUSION_JAX_ALLOCATOR": "system"}, libraries) is None
  monkeypatch.setattr(malloc, "has_accelerator", lambda environ: True)
  assert malloc.tcmalloc_environment({}, libraries) is None
  assert malloc.tcmalloc_environment({"DIFFUSION_JAX_ALLOCATOR": "tcmalloc"}, libraries)["LD_PRELOAD"] == str(library)
  # Not installed: auto runs as is; asked for, a clear error. A bad value names the choices.
  assert malloc.tcmalloc_environment({}, (missing,)) is None
  with pytest.raises(FileNotFoundError, match="libtcmalloc-minimal4"):
    malloc.tcmalloc_environment({"DIFFUSION_JAX_ALLOCATOR": "tcmalloc"}, (missing,))
  with pytest.raises(ValueError, match="auto, tcmalloc, system"):
    malloc.tcmalloc_environment({"DIFFUSION_JAX_ALLOCATOR": "jemalloc"}, libraries)


def test_cli_process_runs_on_tcmalloc_where_installed():
  installed = [path for path in malloc.TCMALLOC_LIBRARIES if os.path.exists(path)]
  if not installed:
    pytest.skip("no tcmalloc on this host (apt-get install libtcmalloc-minimal4)")
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DIFFUSION_JAX_ALLOCATOR")}
  env.update(JAX_PLATFORMS="cpu", LD_DEBUG="files")  # the loader names each library it initialises
  run = subprocess.run([sys.executable, "-m", "diffusion_jax", "export", "--help"], env=env, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "usage: diffusion_jax export" in run.stdout
  assert f"calling init: {installed[0]}" in run.stderr
  env["DIFFUSION_JAX_ALLOCATOR"] = "system"
  run = subprocess.run([sys.executable, "-m", "diffusion_jax", "export", "--help"], env=env, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0 and "libtcmalloc" not in run.stderr
