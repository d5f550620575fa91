"""Training that survives: SIGKILL and SIGTERM mid-run, NaN batches, gradient
accumulation, the weight-decay mask, the optimizers, and the MFU arithmetic."""
import os
import shutil
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn

from diffusion_jax import checkpoint, metrics, sharding
from diffusion_jax import config as config_lib
from diffusion_jax.data import pipeline
from diffusion_jax.diffusion import objectives
from diffusion_jax.train import dit_task, loop
from diffusion_jax.train import state as state_lib

REPO = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(REPO, "configs", "dit_image.py")


def smoke_config(data_dir, *overrides):
  config = config_lib.load_config(CONFIG + ":smoke")
  config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", *overrides])
  return config


def _tree_equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _train_cli(workdir, data_dir, overrides, signal_at):
  """`python -m diffusion_jax train` in a child process that signals itself after step `signal_at`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  env[loop.TEST_SIGNAL_ENV] = signal_at
  cmd = [sys.executable, "-m", "diffusion_jax", "train", f"--config={CONFIG}:smoke", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}"] + [f"--config.{o}" for o in overrides]
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _latest_step(workdir):
  manager = checkpoint.make_manager(workdir, keep=10, create=False)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def test_sigkill_then_sigterm_then_resume_is_bitwise_exact(data_dir, tmp_path):
  overrides = ("train.steps=12", "train.ckpt_every=3", "train.log_every=3")
  straight, _ = loop.train(smoke_config(data_dir, *overrides), str(tmp_path / "straight"))

  workdir = str(tmp_path / "interrupted")
  # Killed right after step 9's async save was started: it may be half written.
  killed = _train_cli(workdir, data_dir, overrides, "9:SIGKILL")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  committed = _latest_step(workdir)
  assert committed in (6, 9), committed  # saving 9 first waited for 6 to commit

  # A leftover of a save cut short (a complete-looking step 11 under Orbax's
  # temporary name) is never restored.
  ckpts = os.path.join(workdir, "checkpoints")
  shutil.copytree(os.path.join(ckpts, str(committed)), os.path.join(ckpts, "11.orbax-checkpoint-tmp-1234"))

  # Preempted after step 10: saves step 10, waits for it, exits 0.
  preempted = _train_cli(workdir, data_dir, overrides, "10:SIGTERM")
  assert preempted.returncode == 0, preempted.stderr[-2000:]
  assert f"resumed from step {committed} in {workdir}" in preempted.stdout
  assert f"preempted: saved step 10 in {workdir}" in preempted.stdout
  assert _latest_step(workdir) == 10

  # The restart finishes the run with exactly the uninterrupted result.
  resumed, _ = loop.train(smoke_config(data_dir, *overrides), workdir)
  assert int(resumed.step) == 12
  _tree_equal(jax.device_get(straight), jax.device_get(resumed))


def _nan_from_call(monkeypatch, first_bad_call):
  """Batches from the `first_bad_call`-th (0-based) on have NaN patches."""
  real = pipeline.make_global_batch
  calls = []

  def corrupting(local, batch_sharding):
    if len(calls) >= first_bad_call:
      local = dict(local, patches=np.full_like(local["patches"], np.nan))
    calls.append(1)
    return real(local, batch_sharding)

  monkeypatch.setattr(pipeline, "make_global_batch", corrupting)


def _restore(config, workdir, step):
  mesh = sharding.make_mesh(config.mesh)
  _, _, _, abstract, shardings = loop.build_state(config, mesh, sharding.logical_rules(config.mesh))
  manager = checkpoint.make_manager(workdir, keep=10, create=False)
  try:
    return jax.device_get(checkpoint.restore(manager, step, checkpoint.abstract_with_shardings(abstract, shardings)))
  finally:
    manager.close()


def test_nan_batch_is_skipped_counted_and_too_many_stop_without_saving(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  base = ("train.ckpt_every=1", "train.log_every=1", "train.max_consecutive_skips=2")
  loop.train(smoke_config(data_dir, "train.steps=2", *base), workdir)
  good = _restore(smoke_config(data_dir, *base), workdir, 2)

  # Step 3's batch is NaN: the update is skipped and counted, nothing else changes.
  with monkeypatch.context() as patch:
    _nan_from_call(patch, 0)
    state, last = loop.train(smoke_config(data_dir, "train.steps=3", *base), workdir)
  state = jax.device_get(state)
  assert int(state.step) == 3 and int(state.skipped) == 1
  assert last["skipped"] == 1 and last["skipped_steps"] == 1
  _tree_equal((good.params, good.opt_state, good.ema_params), (state.params, state.opt_state, state.ema_params))

  # A finite step resets the streak; then two NaN steps in a row (5 and 6) stop the run.
  with monkeypatch.context() as patch:
    _nan_from_call(patch, 1)
    with pytest.raises(loop.TrainingDiverged, match=r"2 consecutive non-finite updates .* at step 6 .* step 5"):
      loop.train(smoke_config(data_dir, "train.steps=10", *base), workdir)
  assert _latest_step(workdir) == 5  # step 6 was not saved
  at5 = _restore(smoke_config(data_dir, *base), workdir, 5)
  assert int(at5.skipped) == 2
  _tree_equal(_restore(smoke_config(data_dir, *base), workdir, 4).params, at5.params)


def test_resilience_config_errors(data_dir, tmp_path):
  for override, message in [("train.grad_accum_steps=3", "must divide into train.grad_accum_steps=3"),
                            ("train.grad_accum_steps=0", "train.grad_accum_steps=0 must be an int >= 1"),
                            ("train.max_consecutive_skips=-1", "max_consecutive_skips=-1"),
                            ("train.profile_steps=(3,1)", "profile_steps=\\(3, 1\\)")]:
    with pytest.raises(config_lib.ConfigError, match=message):
      loop.train(smoke_config(data_dir, override), str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")  # refused before anything was written


def test_profile_window_writes_a_trace(data_dir, tmp_path):
  workdir = tmp_path / "run"
  loop.train(smoke_config(data_dir, "train.steps=3", "train.profile_steps=(1,2)", "train.ckpt_every=100"),
             str(workdir))
  traces = [f for _, _, files in os.walk(workdir / "profile") for f in files if f.endswith(".xplane.pb")]
  assert len(traces) == 1


def _deterministic_loss(params, model, objective, batch, rng, config, *, train=True):
  """dit_task.loss_fn's shape with fixed per-example timesteps and no noise, so
  a micro-batch's loss is exactly its share of the big batch's."""
  segment_ids = batch["segment_ids"]
  t_example = (batch["example_ids"] % objective.num_timesteps).astype(jnp.float32)
  t = objectives.per_token(t_example, segment_ids)
  out = model.apply({"params": params}, batch["patches"], t, batch["labels"], segment_ids, batch["positions"],
                    train=False)
  token_loss = jnp.mean((out[..., :batch["patches"].shape[-1]] - batch["patches"]) ** 2, axis=-1)
  loss = objectives.reduce_per_example(token_loss, segment_ids, (segment_ids > 0) & ~batch["cond_mask"],
                                       batch["labels"].shape[1])
  return loss, {"loss": loss}


def test_gradient_accumulation_equals_the_big_batch(data_dir, monkeypatch):
  monkeypatch.setattr(dit_task, "loss_fn", _deterministic_loss)
  config = smoke_config(data_dir, "mesh.shape=(2,1,1)")
  local = next(iter(pipeline.make_dataset(config, split="train", seed=0)))
  # Unequal micro-batches (micro-batch i holds rows i and i + 4): row 0 is
  # padding, row 5 only conditioning, so micro-batches 0 and 1 carry one
  # example and 2 and 3 carry two. An unweighted mean of micro-batch means
  # would weigh those examples twice.
  local["segment_ids"][0] = 0
  local["cond_mask"][5] = True
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  rules = sharding.logical_rules(config.mesh)
  model, _, init_fn, _, state_shardings = loop.build_state(config, mesh, rules)
  batch = pipeline.make_global_batch(local, sharding.batch_sharding(mesh))
  sgd = optax.sgd(1.0)  # params - grads: the update shows the gradient itself
  results = {}
  for accum in (1, 4):
    config.train.grad_accum_steps = accum
    step = jax.jit(loop.make_train_step(config, model, sgd))
    with sharding.activate(mesh, rules):
      state = init_fn(jax.random.PRNGKey(0))
      state = state.replace(opt_state=sgd.init(state.params))
      results[accum] = jax.device_get(step(state, batch))
  (big, big_aux), (acc, acc_aux) = results[1], results[4]
  np.testing.assert_allclose(acc_aux["loss"], big_aux["loss"], rtol=1e-6)
  np.testing.assert_allclose(acc_aux["grad_norm"], big_aux["grad_norm"], rtol=1e-5)
  assert big_aux["grad_norm"] > 0
  for x, y in zip(jax.tree_util.tree_leaves(acc.params), jax.tree_util.tree_leaves(big.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)

  # The micro-batches really are unequal, so the weighting was exercised.
  counts = [float(loop.loss_examples(jax.tree_util.tree_map(lambda x: x[i::4], local), 1)) for i in range(4)]
  assert counts == [1.0, 1.0, 2.0, 2.0]


def test_weight_decay_mask_spares_biases_scales_and_embeddings(data_dir):
  config = smoke_config(data_dir)
  mesh = sharding.make_mesh(config.mesh)
  _, _, _, abstract, _ = loop.build_state(config, mesh, sharding.logical_rules(config.mesh))
  mask = state_lib._decay_mask(abstract.params)
  decided = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  # Scanned blocks stack biases to 2-D: the mask goes by name, not rank.
  assert decided["['blocks']['mlp']['fc1']['bias']"] is False
  assert decided["['blocks']['mlp']['fc1']['kernel']"] is True
  assert decided["['y_embedder']['embedding_table']['embedding']"] is False
  assert all(m == (k.endswith("['kernel']")) for k, m in decided.items())

  # And the optimizer applies it: zero gradients, one step of decay.
  params = dict(dense=dict(kernel=jnp.ones((2, 2)), bias=jnp.ones((2, 2))), norm=dict(scale=jnp.ones(2)),
                embed=dict(embedding=jnp.ones((3, 2))))
  train_config = config_lib.from_json(config_lib.to_json(config)).train
  train_config.update(weight_decay=0.5, lr=0.1, warmup_steps=1, grad_clip=0.0)
  optimizer = state_lib.make_optimizer(train_config)
  opt_state = optimizer.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  _, opt_state = optimizer.update(zeros, opt_state, params)  # step 0 has lr 0 (warmup)
  updates, _ = optimizer.update(zeros, opt_state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5)
  for untouched in (new["dense"]["bias"], new["norm"]["scale"], new["embed"]["embedding"]):
    np.testing.assert_array_equal(untouched, 1.0)


def test_muon_orthogonalises_the_blocks_matrices_and_adamw_updates_the_rest(data_dir, tmp_path):
  from optax.contrib import MuonDimensionNumbers as Dims

  def dimensions_of(config):
    task = loop.TASKS[config.task]
    boxed = jax.eval_shape(lambda r: task.init_params(task.build_model(config), config, r), jax.random.PRNGKey(0))
    return boxed, {jax.tree_util.keystr(p): d for p, d in jax.tree_util.tree_leaves_with_path(
        state_lib.muon_dimensions(boxed), is_leaf=lambda x: x is None or isinstance(x, Dims))}

  def dimensions(*overrides):
    config = smoke_config(data_dir, "train.optimizer=muon", *overrides)
    return (config, *dimensions_of(config))

  # Scanned blocks: axis 0 stacks the layers; the outputs are the trailing axes shaped like the bias.
  config, boxed, dims = dimensions()
  assert dims["['blocks']['attn']['query']['kernel']"] == Dims((1,), (2, 3))  # [layers, width, heads, head_dim]
  assert dims["['blocks']['attn']['proj']['kernel']"] == Dims((1, 2), (3,))  # [layers, heads, head_dim, width]
  assert dims["['blocks']['mlp']['fc2']['kernel']"] == Dims((1,), (2,))
  assert dims["['blocks']['adaLN_modulation']['kernel']"] == Dims((1,), (2,))
  for adamw in ("['blocks']['mlp']['fc1']['bias']", "['x_embedder']['kernel']", "['final_layer']['linear']['kernel']",
                "['y_embedder']['embedding_table']['embedding']"):
    assert dims[adamw] is None, adamw
  _, _, unrolled = dimensions("model.scan_layers=False")
  assert unrolled["['blocks_0']['attn']['query']['kernel']"] == Dims((0,), (1, 2))
  # The VAE's residual blocks: a convolution's window and input channels are the inputs, its output
  # channels the outputs; the convolutions into and out of the blocks stay with AdamW.
  _, vae_dims = dimensions_of(config_lib.load_config(config_lib.recipe_path("vae_video.py") + ":smoke"))
  matrices = [path for path, d in vae_dims.items() if d is not None]
  assert matrices and all("block" in path and path.endswith("['kernel']") for path in matrices), matrices
  assert all(vae_dims[path] == Dims((0, 1, 2, 3), (4,)) for path in matrices)
  assert vae_dims["['vae']['encoder']['mid_block']['conv1']['kernel']"] == Dims((0, 1, 2, 3), (4,))
  for adamw in ("['vae']['encoder']['conv_in']['kernel']", "['vae']['decoder']['conv_out']['kernel']",
                "['vae']['encoder']['mid_block']['conv1']['bias']", "['vae']['encoder']['mid_block']['norm1']['scale']"):
    assert vae_dims[adamw] is None, adamw

  # One update after the warmup: Muon's is near-orthogonal where the gradient was far from it (singular
  # values 1..30); AdamW's normalises every element of a leaf alike (about lr for these constant gradients).
  train_config = config_lib.from_json(config_lib.to_json(config)).train
  train_config.update(lr=0.1, warmup_steps=1, grad_clip=0.0)
  optimizer = state_lib.make_optimizer(train_config, boxed)
  params = nn.meta.unbox(boxed)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  rng = np.random.default_rng(0)
  fc2 = params["blocks"]["mlp"]["fc2"]["kernel"]
  u, _ = np.linalg.qr(rng.normal(size=(fc2.shape[1], fc2.shape[1])))
  v, _ = np.linalg.qr(rng.normal(size=(fc2.shape[2], fc2.shape[2])))
  singular = np.logspace(0, 1.5, min(fc2.shape[1:]))
  matrix = (u[:, :len(singular)] * singular) @ v[:len(singular)]
  grads = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.5, x.dtype), params)
  grads["blocks"]["mlp"]["fc2"]["kernel"] = jnp.broadcast_to(jnp.asarray(matrix, jnp.float32), fc2.shape)
  opt_state = optimizer.init(params)
  _, opt_state = optimizer.update(grads, opt_state, params)  # step 0: lr 0 (warmup)
  updates, _ = optimizer.update(grads, opt_state, params)
  muon_singular = np.linalg.svd(np.asarray(updates["blocks"]["mlp"]["fc2"]["kernel"][0]), compute_uv=False)
  assert muon_singular.max() / muon_singular.min() < 3, muon_singular
  adamw_update = np.asarray(updates["x_embedder"]["kernel"])
  np.testing.assert_allclose(adamw_update, adamw_update.flat[0], rtol=1e-6)
  assert -0.13 < adamw_update.flat[0] < -0.08

  # Through the loop: Muon's masked state is sharded, checkpointed and resumed.
  workdir = str(tmp_path / "muon")
  loop.train(smoke_config(data_dir, "train.optimizer=muon", "train.steps=2", "train.ckpt_every=2"), workdir)
  _, resumed = loop.train(smoke_config(data_dir, "train.optimizer=muon", "train.steps=4", "train.ckpt_every=2"),
                          workdir)
  assert _latest_step(workdir) == 4 and np.isfinite(resumed["loss"])

  # A checkpoint written before train.optimizer and train.muon_lr_scale existed was AdamW's.
  older, current = (config_lib.from_json(config_lib.to_json(smoke_config(data_dir))) for _ in range(2))
  with older.unlocked():
    del older.train["optimizer"], older.train["muon_lr_scale"]
  checkpoint.check_same_model(older, current, workdir)
  with current.unlocked():
    current.train.optimizer = "muon"
  with pytest.raises(checkpoint.CheckpointMismatch, match="train.optimizer is 'adamw' there"):
    checkpoint.check_same_model(older, current, workdir)

  with pytest.raises(ValueError, match="weight_decay"):
    state_lib.make_optimizer(types.SimpleNamespace(**{**train_config.to_dict(), "weight_decay": 0.1}), boxed)
  with pytest.raises(ValueError, match="found no weight matrices"):
    state_lib.make_optimizer(train_config, {"conv": {"kernel": boxed["x_embedder"]["kernel"]}})


def test_learning_rate_schedules():
  train = types.SimpleNamespace(lr=1.0, warmup_steps=10, steps=100, lr_schedule="wsd", cooldown_fraction=0.3)
  wsd = state_lib.learning_rate_schedule(train)
  # Warmup, the full rate until the last 30 steps, then linearly down to 0 at the last step.
  np.testing.assert_allclose([float(wsd(s)) for s in (0, 5, 10, 69, 70, 85, 100)],
                             [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)
  train.lr_schedule = "constant"
  assert float(state_lib.learning_rate_schedule(train)(99)) == 1.0
  train.lr_schedule = "cosine"
  assert float(state_lib.learning_rate_schedule(train)(100)) < 1e-6
  for schedule, fraction, message in (("wsd", 0.0, "cooldown_fraction"), ("wsd", 1.5, "cooldown_fraction"),
                                      ("linear", 0.3, "unknown train.lr_schedule")):
    train.lr_schedule, train.cooldown_fraction = schedule, fraction
    with pytest.raises(ValueError, match=message):
      state_lib.learning_rate_schedule(train)


def test_flops_peak_and_mfu():
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  assert metrics.step_flops(compiled, num_devices=3) == pytest.approx(3 * 2 * 64 * 32 * 16, rel=0.01)
  kinds = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
           "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12, "Some future chip": None}
  for kind, peak in kinds.items():
    assert metrics.device_peak_flops(types.SimpleNamespace(platform="gpu", device_kind=kind)) == peak, kind
  host_peak = metrics.measure_cpu_peak_flops()
  assert 1e8 < host_peak < 1e14 and metrics.measure_cpu_peak_flops() == host_peak  # measured once
  cpu = jax.devices("cpu")[0]
  assert metrics.device_peak_flops(cpu) == pytest.approx(host_peak / len(jax.local_devices(backend="cpu")))
  assert metrics.mfu(1e12, 2.0, 4, 1e12) == pytest.approx(0.5)
  assert metrics.mfu(None, 2.0, 4, 1e12) is None and metrics.mfu(1e12, 2.0, 4, None) is None
  assert [metrics.format_duration(s) for s in (12, 245, 3720)] == ["12s", "4m05s", "1h02m"]
