"""The train state (params, optimizer state, EMA, step, rng, skip count) and the optimizer.

Everything that makes a run resumable lives in `TrainState`, including the
rng, so a restored run draws the same noise as an uninterrupted one, and the
count of skipped (non-finite) updates, so its total survives a restart.
"""
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from optax.contrib import MuonDimensionNumbers, muon


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


def make_optimizer(train_config, boxed_params=None) -> optax.GradientTransformation:
  """Warmup, the schedule and global-norm clipping around train.optimizer:
    "adamw"  AdamW (DiT: AdamW, lr 1e-4, no decay);
    "muon"   Muon (optax.contrib) on the weight matrices of the model's blocks, AdamW on every
             other leaf. Muon's updates are scaled to AdamW's RMS (0.2, "Muon is Scalable for LLM
             Training", 2025), so train.lr means about the same step for both; needs `boxed_params`
             (the abstract params with their logical axis names) to find the matrices."""
  schedule = learning_rate_schedule(train_config)
  clip = optax.clip_by_global_norm(train_config.grad_clip) if train_config.grad_clip else optax.identity()
  if train_config.optimizer == "adamw":
    return optax.chain(clip, optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=train_config.weight_decay,
                                         mask=_decay_mask))
  if train_config.optimizer != "muon":
    raise ValueError(f"unknown train.optimizer {train_config.optimizer!r}; use 'adamw' or 'muon'")
  if train_config.weight_decay:
    raise ValueError("train.optimizer='muon' takes no train.weight_decay (its AdamW part would decay biases and "
                     "norms too); set it to 0")
  if boxed_params is None:
    raise ValueError("train.optimizer='muon' needs the params' logical axis names (make_optimizer's boxed_params)")
  dimensions = muon_dimensions(boxed_params)
  if not any(d is not None for d in jax.tree_util.tree_leaves(dimensions, is_leaf=_is_dimensions)):
    raise ValueError("train.optimizer='muon' found no weight matrices in blocks it trains (state.MUON_BLOCKS: "
                     "the DiT's and the VAE's) in this model; use 'adamw'")
  scale = float(train_config.muon_lr_scale)
  return optax.chain(clip, muon(lambda step: scale * schedule(step), adam_learning_rate=schedule,
                                adam_b1=0.9, adam_b2=0.999, consistent_rms=0.2,
                                muon_weight_dimension_numbers=dimensions))


def _is_dimensions(x):
  return x is None or isinstance(x, MuonDimensionNumbers)


# The modules whose weight matrices Muon trains: the DiT's transformer blocks ('blocks' scanned,
# 'blocks_<i>' unrolled) and the VAE's residual blocks ('down_<l>_block_<i>', 'mid_block',
# 'up_<l>_block_<i>'). The layers that map into and out of the model's width stay with AdamW.
MUON_BLOCKS = re.compile(r"blocks(_\d+)?|(down_\d+_|up_\d+_|mid_)block(_\d+)?")


def muon_dimensions(boxed_params):
  """Muon's matrices: for each kernel inside a MUON_BLOCKS module that has a bias beside it, its
  trailing axes (as many as the bias has, 'layers' aside) are the outputs, an axis named 'layers'
  (nn.scan's stacked blocks) holds one matrix per block, and the other axes are the inputs (a
  convolution's kernel: its window and input channels). Other leaves (embeddings, the first and
  final layers, the conditioning MLPs, biases, norms) get None: AdamW's."""
  flat = traverse_util.flatten_dict(boxed_params)
  dimensions = {}
  for path, leaf in flat.items():
    dimensions[path] = None
    bias = flat.get(path[:-1] + ("bias",))
    in_blocks = any(MUON_BLOCKS.fullmatch(name) for name in path[:-1])
    if path[-1] != "kernel" or bias is None or not in_blocks:
      continue
    names = tuple(getattr(leaf, "names", ()))
    shape = nn.meta.unbox(leaf).shape
    stacked = tuple(i for i, name in enumerate(names) if name == "layers")
    num_outputs = len(nn.meta.unbox(bias).shape) - len(stacked)
    outputs = tuple(range(len(shape) - num_outputs, len(shape)))
    inputs = tuple(i for i in range(len(shape)) if i not in stacked + outputs)
    dimensions[path] = MuonDimensionNumbers(inputs, outputs)
  return traverse_util.unflatten_dict(dimensions)


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
