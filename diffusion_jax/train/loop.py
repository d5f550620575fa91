"""The one training loop. Tasks plug in a model builder and a loss, nothing more.

Read it top to bottom: setup, checkpoint guard, data, model and state,
train step, loop. Every process runs the same code; each reads its own
shard of the data, and process 0 alone writes logs.
"""
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import checkpoint
from diffusion_jax import config as config_lib
from diffusion_jax import metrics
from diffusion_jax import sharding
from diffusion_jax.data import pipeline
from diffusion_jax.train import dit_task
from diffusion_jax.train import state as state_lib

# The small table of tasks: each module offers validate, build_model,
# make_schedule, init_params and loss_fn.
TASKS = {"dit": dit_task}


class _IteratorSnapshot:
  """The data iterator's state frozen at a step, for an async save.

  Orbax may write the items after `save` returns, while the loop has already
  drawn the next batches; the snapshot keeps the state of the saved step.
  """

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state(), indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


def build_state(config, mesh, rules):
  """Model, optimizer and the abstract, sharded train state (nothing allocated yet).

  Returns (model, optimizer, init_fn, abstract_state, state_shardings); init_fn(rng)
  creates the state directly in its shardings.
  """
  task = TASKS[config.task]
  model = task.build_model(config)
  optimizer = state_lib.make_optimizer(config.train)

  def init_boxed(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = task.init_params(model, config, params_rng)
    return state_lib.create_state(params, optimizer, state_rng)

  rng = jax.random.PRNGKey(config.train.seed)
  with sharding.activate(mesh, rules):
    abstract_boxed = jax.eval_shape(init_boxed, rng)
  state_shardings = sharding.shardings_of(abstract_boxed, mesh, rules)
  abstract_state = nn.meta.unbox(abstract_boxed)

  def init_fn(rng):
    with sharding.activate(mesh, rules):
      return jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=state_shardings)(rng)

  return model, optimizer, init_fn, abstract_state, state_shardings


def make_train_step(config, model, optimizer):
  """One update: loss and grads, AdamW, EMA. A non-finite loss or gradient skips it."""
  task = TASKS[config.task]
  schedule = task.make_schedule(config)
  lr_fn = state_lib.learning_rate_schedule(config.train)

  def train_step(state, batch):
    grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, model, schedule, batch, state.step_rng(), config)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    updated = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=state_lib.ema_update(state.ema_params, params, config.train.ema_decay, state.step),
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Skip the update (params, optimizer, EMA unchanged) but advance the step,
    # so the next batch and rng are new.
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, state)
    new_state = new_state.replace(step=state.step + 1)
    aux = dict(aux, grad_norm=grad_norm, lr=lr_fn(state.step), skipped=1 - finite.astype(jnp.int32))
    return new_state, aux

  return train_step


def train(config, workdir: str):
  """Trains until config.train.steps, resuming from the newest checkpoint.

  Returns (final state, last logged metrics).
  """
  # ------------------------------------------------------------------ setup
  task = TASKS.get(config.task)
  config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)

  # ------------------------------------------- refuse another model's workdir
  manager = checkpoint.make_manager(workdir, keep=config.train.keep_ckpts)
  saved = checkpoint.saved_config(manager)
  if saved is not None:
    checkpoint.check_same_model(saved, config, workdir)
  writer = metrics.for_process(workdir, config.train.steps)

  # ------------------------------------------------------------------- data
  dataset = pipeline.make_dataset(
      config, split=config.data.split, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.data.shuffle_seed)
  data_iter = iter(dataset)
  batch_sharding = sharding.batch_sharding(mesh)

  # ------------------------------------------------------ model and state
  model, optimizer, init_fn, abstract_state, state_shardings = build_state(config, mesh, rules)
  start_step = manager.latest_step()
  if start_step is None:
    state = init_fn(jax.random.PRNGKey(config.train.seed))
  else:
    target = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
    state = checkpoint.restore(manager, start_step, target, data_iter)
    print(f"resumed from step {start_step} in {workdir}", flush=True)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_state.params))

  # ------------------------------------------------------------- train step
  step_fn = jax.jit(
      make_train_step(config, model, optimizer),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )

  # ------------------------------------------------------------------- loop
  step = int(jax.device_get(state.step))
  total = config.train.steps
  if jax.process_index() == 0:
    print(f"{config.task}: {num_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, steps {step}->{total}", flush=True)
  last = {}
  window_start, window_steps, window_examples, window_tokens = time.time(), 0, 0, 0
  while step < total:
    local = next(data_iter)
    batch = pipeline.make_global_batch(local, batch_sharding)
    with sharding.activate(mesh, rules):
      state, aux = step_fn(state, batch)
    step += 1
    window_steps += 1
    window_examples += int(np.sum(local["example_ids"] >= 0)) * jax.process_count()
    window_tokens += int(np.sum(local["segment_ids"] > 0)) * jax.process_count()

    if step % config.train.log_every == 0 or step == total:
      aux = jax.device_get(aux)
      elapsed = time.time() - window_start
      last = dict(aux, steps_per_s=window_steps / elapsed, examples_per_s=window_examples / elapsed,
                  tokens_per_s=window_tokens / elapsed)
      writer.write(step, last)
      writer.progress(step, {k: last[k] for k in ("loss", "grad_norm", "steps_per_s", "examples_per_s")})
      window_start, window_steps, window_examples, window_tokens = time.time(), 0, 0, 0

    if step % config.train.ckpt_every == 0 or step == total:
      checkpoint.save(manager, step, state, _IteratorSnapshot(data_iter), config)

  manager.wait_until_finished()
  manager.close()
  writer.close()
  return state, {k: float(v) for k, v in last.items()}
