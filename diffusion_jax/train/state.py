"""The train state (params, optimizer state, EMA, step, rng, skip count) and the optimizer.

Everything that makes a run resumable lives in `TrainState`, including the
rng, so a restored run draws the same noise as an uninterrupted one, and the
count of skipped (non-finite) updates, so its total survives a restart.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # uint32[2]: the run's key; step keys are folded from it
  skipped: jax.Array  # int32 scalar: steps whose non-finite loss or gradient was not applied

  def step_rng(self) -> jax.Array:
    """A fresh key for this step, the same for a resumed run."""
    return jax.random.fold_in(self.rng, self.step)


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup to `lr`, then (train.lr_schedule) "constant"; "cosine" decay to 0 at train.steps;
  or "wsd" (warmup-stable-decay): constant, then a linear cooldown to 0 over the last
  train.cooldown_fraction of the steps. A short run keeps learning at the full rate for most of
  its steps and still ends on a cooled-down model, where a cosine decays too soon (BENCHMARKS.md)."""
  warmup = max(int(train_config.warmup_steps), 1)
  decay = train_config.lr_schedule
  lr = train_config.lr
  if decay == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(train_config.steps, warmup + 1))
  if decay == "wsd":
    fraction = float(train_config.cooldown_fraction)
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"train.cooldown_fraction must be in (0, 1], got {fraction}")
    cooldown = max(int(round(train_config.steps * fraction)), 1)
    stable_end = max(int(train_config.steps) - cooldown, warmup)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr),
                                 optax.linear_schedule(lr, 0.0, cooldown)], [warmup, stable_end])
  raise ValueError(f"unknown train.lr_schedule {decay!r}; use 'constant', 'cosine' or 'wsd'")


def _decay_mask(params):
  """Weight decay on weight matrices only: leaves named `kernel` (Dense, DenseGeneral,
  Conv and the einsum projections), not biases, norm scales or embedding tables.

  Decided by name, not by rank: scanned layers stack every leaf along a
  leading layers axis, so their biases are 2-D.
  """
  def wants_decay(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    return names[-1] == "kernel" and "embedding" not in names
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with warmup and global-norm clipping (DiT: AdamW, lr 1e-4, no decay)."""
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip) if train_config.grad_clip else optax.identity(),
      optax.adamw(learning_rate_schedule(train_config), b1=0.9, b2=0.999,
                  weight_decay=train_config.weight_decay, mask=_decay_mask),
  )


def create_state(params, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree_util.tree_map(jnp.copy, params),
      rng=rng,
      skipped=jnp.zeros((), jnp.int32),
  )


def ema_update(ema, params, decay: float, step):
  """EMA with a warmup, min(decay, (1 + step) / (10 + step)) (TF's num_updates rule).

  Without the warmup a short run's EMA still mostly holds the initial params
  (0.999 ** 1000 = 0.37), whose zero-initialised output layer samples noise.
  """
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
