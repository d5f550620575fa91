"""Loss per timestep bucket, the in-loop held-out evaluation, and bfloat16 training."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import sharding
from diffusion_jax.train import dit_task, loop
from test_train import first_batch, fixed_batch_setup, smoke_config


def test_bucket_losses_split_examples_by_t_and_empty_buckets_are_zero():
  token_loss = jnp.array([[1.0, 3.0, 5.0, 7.0, jnp.nan]])  # the padding token's NaN must not leak
  segment_ids = jnp.array([[1, 1, 2, 3, 0]])
  loss_mask = segment_ids > 0
  t_example = jnp.array([[10, 99, 24]])  # T = 100: buckets 0, 3, 0
  out = dit_task.timestep_bucket_losses(token_loss, segment_ids, loss_mask, t_example, 100)
  assert float(out["loss_t0"]) == (2.0 + 7.0) / 2 and float(out["examples_t0"]) == 2
  assert float(out["loss_t3"]) == 5.0 and float(out["examples_t3"]) == 1
  for i in (1, 2):
    assert float(out[f"loss_t{i}"]) == 0.0 and float(out[f"examples_t{i}"]) == 0


def test_bucket_losses_weighted_by_counts_give_the_loss(data_dir):
  config = smoke_config(data_dir)
  batch = first_batch(config)
  model = dit_task.build_model(config)
  params = dit_task.init_params(model, config, jax.random.PRNGKey(0))
  loss, aux = dit_task.loss_fn(params, model, dit_task.make_objective(config), batch, jax.random.PRNGKey(3), config)
  counts = np.array([float(aux[f"examples_t{i}"]) for i in range(4)])
  losses = np.array([float(aux[f"loss_t{i}"]) for i in range(4)])
  assert counts.sum() == config.train.global_batch * config.data.examples_per_row
  np.testing.assert_allclose(np.dot(losses, counts) / counts.sum(), float(loss), rtol=1e-5)


def _logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_eval_runs_at_its_steps_on_the_validation_split_and_is_reproducible(data_dir, tmp_path):
  config = smoke_config(data_dir, "train.steps=10", "train.eval_every=4", "train.eval_batches=2",
                        "train.ckpt_every=1000")
  workdir = str(tmp_path / "run")
  state, _ = loop.train(config, workdir)
  evals = [r for r in _logged(workdir) if "eval/loss" in r]
  assert [r["step"] for r in evals] == [4, 8]
  for record in evals:
    assert record["eval/examples"] == 2 * config.train.global_batch
    for name in ["eval/loss"] + [f"eval/loss_t{i}" for i in range(4) if f"eval/loss_t{i}" in record]:
      assert np.isfinite(record[name]) and record[name] > 0, (name, record)
  assert "eval/loss_t0" in evals[0] or "eval/loss_t3" in evals[0]
  assert evals[0]["eval/loss"] != evals[1]["eval/loss"]  # the EMA params moved

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  model, _, _, _, shardings = loop.build_state(config, mesh, rules)
  validation = loop.make_evaluator(config, model, mesh, rules, shardings.ema_params, "validation")
  first, again = validation(state.ema_params), validation(state.ema_params)
  assert first == again  # fixed set, fixed noise: equal params, equal numbers
  on_train = loop.make_evaluator(config, model, mesh, rules, shardings.ema_params, "train")(state.ema_params)
  assert on_train["eval/loss"] != first["eval/loss"]
  # The loop's last eval (step 8) used the same set and noise: a 2-step-later EMA differs from it.
  assert first["eval/loss"] != evals[1]["eval/loss"]


def test_bfloat16_compute_trains_with_float32_params(data_dir, tmp_path):
  config = smoke_config(data_dir, "train.steps=40", "train.lr=2e-3", "train.ckpt_every=1000",
                        "train.compute_dtype=bfloat16")
  batch, mesh, rules, model, init_fn, mean_loss = fixed_batch_setup(config)

  with sharding.activate(mesh, rules):
    init_params = init_fn(jax.random.PRNGKey(config.train.seed)).params
    before = float(mean_loss(init_params))
    t = jnp.zeros(batch["segment_ids"].shape, jnp.float32)
    forward = jax.make_jaxpr(lambda p: model.apply({"params": p}, batch["patches"], t, batch["labels"],
                                                   batch["segment_ids"], batch["positions"], train=False))
    program = str(forward(init_params))
  # The model really computes in bfloat16 (its output is cast back to float32).
  assert model.dtype == jnp.bfloat16 and "bf16[" in program
  state, metrics = loop.train(config, str(tmp_path / "run"))
  with sharding.activate(mesh, rules):
    after = float(mean_loss(state.params))
  assert int(state.step) == 40 and np.isfinite(metrics["loss"])
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(state.params))
  assert after < 0.8 * before, (before, after)
