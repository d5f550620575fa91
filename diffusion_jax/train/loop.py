"""The one training loop. Tasks plug in a model builder and a loss, nothing more.

Read it top to bottom: setup, checkpoint guard, data, model and state,
train step, loop. Every process runs the same code; each reads its own
shard of the data, and process 0 alone writes logs.

Resilience:
- Exact resume: the state (with its rng) and each process's data-iterator
  state are checkpointed together, so a run killed at any point (SIGKILL
  included) and restarted ends with the same params, bit for bit, as one that
  never stopped. On CPU no XLA flag is needed for that: XLA's CPU programs are
  deterministic for a fixed device count and mesh (tests/test_resilience.py
  checks it). On GPU add XLA_FLAGS=--xla_gpu_deterministic_ops=true, whose
  atomics-based reductions otherwise vary from run to run. Orbax commits a
  save by a rename, so a save cut short is never restored.
- Preemption: SIGTERM (or, under `jax.distributed` with the preemption
  service, `multihost_utils.reached_preemption_sync_point`) saves the state
  at the next step boundary, waits for the save and returns normally.
- Non-finite updates are skipped inside the step and counted
  (`TrainState.skipped`); `train.max_consecutive_skips` of them in a row stop
  the run with `TrainingDiverged`, without saving.

Test hook: the environment variable DIFFUSION_JAX_TEST_SIGNAL_AT="STEP:SIGNAL"
(e.g. "9:SIGKILL", "7:SIGTERM") makes the process send SIGNAL to itself right
after step STEP's update, log and checkpoint were dispatched; tests use it to
die or be preempted at a chosen step.
"""
import json
import os
import signal
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from diffusion_jax import checkpoint, paths
from diffusion_jax import config as config_lib
from diffusion_jax import distributed
from diffusion_jax import metrics
from diffusion_jax import sharding
from diffusion_jax.config import ConfigError
from diffusion_jax.data import packing, pipeline
from diffusion_jax.train import captioner_task, classifier_task, dit_task, vae_task
from diffusion_jax.train import state as state_lib

# The small table of tasks. Each module offers:
#   validate(config)                         raise ConfigError before anything compiles
#   build_model(config) -> flax module
#   init_params(model, config, rng) -> params (logically boxed)
#   make_objective(config) -> whatever loss_fn needs as `objective` (None for none)
#   make_dataset(config, *, split, process_index, process_count, seed) -> Grain dataset of local batches
#   loss_fn(params, model, objective, batch, rng, config, *, train=True) -> (loss, aux)
#   eval_fn(params, model, objective, batch, index, config) -> aux (deterministic for an index)
#   summarize_eval(auxes) -> {"eval/...": float} over the fixed eval set
# and optionally:
#   LOSS_TAKES_STEP = True                   loss_fn also gets step= (the state's step, a traced int32)
#   model_flops(config, local_batch) -> float  the model FLOPs of a step on that batch (the MFU's
#                                            numerator); without it, XLA's count of the compiled step
#   checkpoint_extras(scores, config) -> dict  JSON saved with each checkpoint, from the eval
#                                            scores of that step's EMA params (evaluated at every save)
TASKS = {"dit": dit_task, "classifier": classifier_task, "vae": vae_task, "captioner": captioner_task}

TEST_SIGNAL_ENV = "DIFFUSION_JAX_TEST_SIGNAL_AT"


def validate(config, *, num_devices: int, process_count: int = 1) -> None:
  """Checks everything that can be checked before compiling: the task, the mesh against the devices and
  the batch, then the task's own fields (TASKS[task].validate); raises ConfigError."""
  if config.task not in TASKS:
    raise ConfigError(f"unknown task {config.task!r}; known: {sorted(TASKS)}")
  shape = config_lib.resolve_mesh_shape(config.mesh.shape, num_devices)
  axes = dict(zip(config.mesh.axes, shape))
  data_parallel = axes.get("data", 1) * axes.get("fsdp", 1)
  batch = config.train.global_batch
  if batch % data_parallel:
    raise ConfigError(f"train.global_batch={batch} is not divisible by the data-parallel size {data_parallel} (mesh data x fsdp)")
  if batch % process_count:
    raise ConfigError(f"train.global_batch={batch} is not divisible by the {process_count} processes")
  TASKS[config.task].validate(config)


class TrainingDiverged(FloatingPointError):
  """Too many consecutive non-finite updates: the run stopped without saving."""


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
  rng = jax.random.PRNGKey(config.train.seed)
  with sharding.activate(mesh, rules):  # the params' shapes and logical axis names (Muon's matrices)
    boxed_params = jax.eval_shape(lambda r: task.init_params(model, config, r), rng)
  optimizer = state_lib.make_optimizer(config.train, boxed_params)

  def init_boxed(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = task.init_params(model, config, params_rng)
    return state_lib.create_state(params, optimizer, state_rng)

  with sharding.activate(mesh, rules):  # the state around those params, without tracing the model again
    abstract_boxed = jax.eval_shape(lambda p, r: state_lib.create_state(p, optimizer, r), boxed_params, rng)
  state_shardings = sharding.shardings_of(abstract_boxed, mesh, rules)
  abstract_state = nn.meta.unbox(abstract_boxed)

  def init_fn(rng):
    with sharding.activate(mesh, rules):
      return jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=state_shardings)(rng)

  return model, optimizer, init_fn, abstract_state, state_shardings


def jit_train_step(config, model, optimizer, mesh, state_shardings):
  """The train step under jax.jit: state and batch shardings in and out, the state donated."""
  return jax.jit(
      make_train_step(config, model, optimizer),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )


def loss_examples(batch, num_examples: int):
  """Examples of a packed batch that carry loss: those with at least one token
  that is neither padding nor conditioning (dit_task.loss_fn's loss mask, the
  examples objectives.reduce_per_example averages over)."""
  segment_ids = batch["segment_ids"]
  carries_loss = segment_ids > 0
  if "cond_mask" in batch:
    carries_loss &= ~batch["cond_mask"]
  ids = jnp.arange(1, num_examples + 1, dtype=segment_ids.dtype)
  present = jnp.any((segment_ids[..., None] == ids) & carries_loss[..., None], axis=1)  # [B, K]
  return jnp.sum(present).astype(jnp.float32)


def split_micro_batches(batch, steps: int):
  """[B, ...] -> [steps, B / steps, ...]; micro-batch i holds rows i, i + steps, i + 2 steps, ...

  The strided split keeps each micro-batch spread over all data-parallel
  devices (a row-block split would leave most devices idle and reshard).
  """
  def split(x):
    x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree_util.tree_map(split, batch)


def make_train_step(config, model, optimizer):
  """One update: loss and grads, AdamW, EMA. A non-finite loss or gradient skips it.

  With train.grad_accum_steps = A > 1 the global batch is split into A
  micro-batches (a lax.scan inside the step, one micro-batch's activations
  alive at a time). The task's loss is a mean over examples, so micro-batch
  i's loss and gradient are weighted by n_i / n (its share of the batch's
  loss-carrying examples): the weighted sum is exactly the big batch's mean
  and its gradient. Each micro-batch draws its own noise and timesteps
  (rng folded with i), so the result equals the big batch's up to which
  random draws were made, not bitwise.
  """
  task = TASKS[config.task]
  objective = task.make_objective(config)
  lr_fn = state_lib.learning_rate_schedule(config.train)
  accum = int(config.train.grad_accum_steps)
  value_and_grad = jax.value_and_grad(task.loss_fn, has_aux=True)

  def loss_and_grads(params, batch, rng, step):
    if getattr(task, "LOSS_TAKES_STEP", False):
      grad_fn = lambda *args: value_and_grad(*args, step=step)
    else:
      grad_fn = value_and_grad
    if accum == 1:
      (loss, aux), grads = grad_fn(params, model, objective, batch, rng, config)
      return loss, aux, grads
    micro = split_micro_batches(batch, accum)
    if "segment_ids" in batch:  # packed rows: weigh by loss-carrying examples
      k = batch["example_ids"].shape[1]  # K, examples per row
      counts = jax.vmap(lambda b: loss_examples(b, k))(micro)
    else:  # fixed-shape examples: every micro-batch holds the same number
      counts = jnp.ones((accum,), jnp.float32)
    # A batch without loss-carrying examples has loss 0 either way; equal weights avoid 0/0.
    weights = jnp.where(counts.sum() > 0, counts / jnp.maximum(counts.sum(), 1.0), 1.0 / accum)

    def one_micro_batch(grads_sum, inputs):
      index, weight, micro_batch = inputs
      (loss, aux), grads = grad_fn(params, model, objective, micro_batch, jax.random.fold_in(rng, index), config)
      grads_sum = jax.tree_util.tree_map(lambda s, g: s + weight * g, grads_sum, grads)
      return grads_sum, (loss, aux)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads, (losses, auxes) = jax.lax.scan(one_micro_batch, zeros, (jnp.arange(accum), weights, micro))
    aux = jax.tree_util.tree_map(lambda v: jnp.tensordot(weights, v, axes=1), auxes)
    return jnp.dot(weights, losses), aux, grads

  def train_step(state, batch):
    loss, aux, grads = loss_and_grads(state.params, batch, state.step_rng(), state.step)
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
    skipped = 1 - finite.astype(jnp.int32)
    # Skip the update (params, optimizer, EMA unchanged) but advance the step,
    # so the next batch and rng are new.
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, state)
    new_state = new_state.replace(step=state.step + 1, skipped=state.skipped + skipped)
    aux = dict(aux, grad_norm=grad_norm, lr=lr_fn(state.step), skipped=skipped, skipped_steps=new_state.skipped)
    return new_state, aux

  return train_step


def _validate_resilience(config, data_parallel: int) -> None:
  train_config = config.train
  accum = train_config.grad_accum_steps
  if not isinstance(accum, int) or accum < 1:
    raise ConfigError(f"train.grad_accum_steps={accum!r} must be an int >= 1")
  if train_config.global_batch % (accum * data_parallel):
    raise ConfigError(
        f"train.global_batch={train_config.global_batch} must divide into train.grad_accum_steps={accum} "
        f"micro-batches that split over the {data_parallel} data-parallel devices")
  profile = tuple(train_config.profile_steps)
  if len(profile) != 2 or not all(isinstance(x, int) for x in profile) or not 0 <= profile[0] <= profile[1]:
    raise ConfigError(f"train.profile_steps={profile!r} must be (start, stop) with 0 <= start <= stop")
  max_skips = train_config.max_consecutive_skips
  if not isinstance(max_skips, int) or max_skips < 0:
    raise ConfigError(f"train.max_consecutive_skips={max_skips!r} must be an int >= 0 (0 = never stop)")


def make_evaluator(config, model, mesh, rules, params_shardings, split: str):
  """evaluate(params) -> the task's held-out metrics ("eval/..."), e.g. the
  diffusion loss per timestep bucket (the MLPerf-style diffusion eval).

  The set is the first train.eval_batches batches of `split`, loaded once;
  the task's eval_fn is deterministic for a batch index (fixed noise), so
  equal params give equal numbers and evaluations at different steps compare
  directly; the task's summarize_eval averages over the set.
  """
  task = TASKS[config.task]
  objective = task.make_objective(config)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  source = iter(task.make_dataset(config, split=split, process_index=jax.process_index(),
                                  process_count=jax.process_count(), seed=config.data.shuffle_seed))
  batches = [pipeline.make_global_batch(next(source), batch_sharding)
             for _ in range(int(config.train.eval_batches))]
  eval_batch = jax.jit(lambda params, batch, index: task.eval_fn(params, model, objective, batch, index, config),
                       in_shardings=(params_shardings, batch_sharding, replicated), out_shardings=replicated)

  def evaluate(params) -> dict:
    with sharding.activate(mesh, rules):
      auxes = [jax.device_get(eval_batch(params, batch, np.int32(index))) for index, batch in enumerate(batches)]
    return task.summarize_eval(auxes)

  return evaluate


def _count_examples_and_tokens(local_batch) -> tuple[int, int]:
  """(examples, non-padding tokens) of a local batch: packed rows count their
  example ids and segment ids; a fixed-shape batch counts its rows and pixels."""
  if "segment_ids" in local_batch:
    return int(np.sum(local_batch["example_ids"] >= 0)), int(np.sum(local_batch["segment_ids"] > 0))
  first = next(iter(v for k, v in local_batch.items() if k not in packing.HOST_KEYS))
  return len(first), 0


def _validate_cadence(train_config) -> None:
  """train.eval_every / eval_batches / ckpt_every: how often the loop evaluates and saves."""
  every, batches = train_config.eval_every, train_config.eval_batches
  if not isinstance(every, int) or every < 0:
    raise ConfigError(f"train.eval_every={every!r} must be an int >= 0 (0 = no evaluation)")
  if every and (not isinstance(batches, int) or batches < 1):
    raise ConfigError(f"train.eval_batches={batches!r} must be an int >= 1")
  ckpt_every = train_config.ckpt_every
  if not isinstance(ckpt_every, int) or ckpt_every < 0:
    raise ConfigError(f"train.ckpt_every={ckpt_every!r} must be an int >= 0 (0 = only at the last step)")


def _test_signal_hook():
  """(step, signal) from DIFFUSION_JAX_TEST_SIGNAL_AT, or None."""
  text = os.environ.get(TEST_SIGNAL_ENV, "")
  if not text:
    return None
  step, _, name = text.partition(":")
  if not step.isdigit() or not isinstance(getattr(signal, name, None), signal.Signals):
    raise ValueError(f"{TEST_SIGNAL_ENV}={text!r}: use STEP:SIGNAL, e.g. 9:SIGKILL")
  return int(step), getattr(signal, name)


class _Preemption:
  """Whether to save and stop now: SIGTERM was received, or all hosts reached
  the distributed preemption service's sync point.

  With several processes and no preemption service, a SIGTERM seen by one
  process is shared at log steps (an allgather), so all stop at the same step.
  """

  def __init__(self, step: int, sync_every: int):
    self.requested = False
    self.sync_every = sync_every
    try:  # False without jax.distributed; RuntimeError when the service is off
      multihost_utils.reached_preemption_sync_point(step)
      self.service = jax.process_count() > 1
    except RuntimeError:
      self.service = False
    self._previous = None
    # The preemption service listens for SIGTERM itself; signal handlers can
    # only be installed from the main thread.
    if not self.service and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self.service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() > 1:
      if step % self.sync_every:
        return False
      return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class _SkipGuard:
  """Counts consecutive skipped updates on the host and stops the run at the limit.

  A step's skip flag is read one step late (after the next step is dispatched)
  so the device is never idle waiting for the host; `settle` reads it at once
  before a log, a save or the end.
  """

  def __init__(self, limit: int, workdir: str, manager):
    self.limit, self.workdir, self.manager = limit, workdir, manager
    self.consecutive = 0
    self._pending = None

  def push(self, skipped, step: int) -> None:
    self.settle()
    self._pending = (skipped, step)

  def settle(self) -> None:
    if self._pending is None:
      return
    skipped, step = self._pending
    self._pending = None
    self.consecutive = self.consecutive + 1 if int(jax.device_get(skipped)) else 0
    if self.limit and self.consecutive >= self.limit:
      self.manager.wait_until_finished()
      raise TrainingDiverged(
          f"{self.consecutive} consecutive non-finite updates (loss or gradient), the last at step {step} "
          f"(train.max_consecutive_skips={self.limit}); stopped without saving, the newest checkpoint in "
          f"{self.workdir} is step {self.manager.latest_step()}")


def train(config, workdir: str, allow_changes=(), *, media_sampler=None):
  """Trains until config.train.steps, resuming from the newest checkpoint.

  media_sampler(config, model) -> sample(params, step) -> {tag: uint8 frames} (or None): what
  TensorBoard shows at eval steps when train.eval_media is on; the train command passes
  sample.media_sampler (sampling sits a layer above the loop, so the loop takes it as an argument).

  Returns (final state, the last logged metrics with the newest held-out scores). On a preemption notice it saves
  the state of the step it stopped at and returns early (the CLI exits 0);
  `state.step` tells where it stopped. allow_changes: names from
  checkpoint.RUN_DEFINING_FIELDS that may differ from the saved run's config.
  """
  # ------------------------------------------------------------------ setup
  task = TASKS.get(config.task)
  validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  _validate_resilience(config, mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
  _validate_cadence(config.train)
  test_signal = _test_signal_hook()

  # ------------------------------------------- refuse another model's workdir
  manager = checkpoint.make_manager(workdir, keep=config.train.keep_ckpts)
  saved = checkpoint.newest_config(manager)
  if saved is not None:
    checkpoint.check_same_model(saved, config, workdir, allow_changes)
  writer = metrics.for_process(workdir, config.train.steps)

  # ------------------------------------------------------------------- data
  dataset = task.make_dataset(
      config, split=config.data.split, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.data.shuffle_seed)
  data_iter = iter(dataset)
  batch_sharding = sharding.batch_sharding(mesh)

  # ------------------------------------------------------ model and state
  model, optimizer, init_fn, abstract_state, state_shardings = build_state(config, mesh, rules)
  target = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
  start_step, state = checkpoint.restore_newest_good(manager, target)  # onto this run's mesh, whatever it was saved on
  if start_step is None:
    state = init_fn(jax.random.PRNGKey(config.train.seed))
  else:
    # The iterator states are per process: exact with the same process count, else a deterministic skip.
    how = distributed.resume_data_iterator(manager, start_step, data_iter)
    if jax.process_index() == 0:
      print(f"resumed from step {start_step} in {workdir} on {jax.process_count()} processes "
            f"(data iterator {how})", flush=True)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_state.params))

  # ------------------------------------------------------------- train step
  step_fn = jit_train_step(config, model, optimizer, mesh, state_shardings)
  compiled = None  # compiled on the first batch; its cost analysis gives the FLOPs for MFU
  flops_per_step = None
  peak_per_device = metrics.device_peak_flops(mesh.devices.flat[0])

  # ------------------------------------------------------------------- eval
  # Held-out loss per timestep bucket with the EMA params, every eval_every steps.
  # A task's checkpoint_extras also needs the eval scores of each saved step.
  eval_every = int(config.train.eval_every)
  extras_fn = getattr(task, "checkpoint_extras", None)
  evaluate = None
  if eval_every or extras_fn is not None:
    evaluate = make_evaluator(config, model, mesh, rules, state_shardings.ema_params, config.data.eval_split)
  # With the held-out scores, TensorBoard gets samples of a few fixed prompts or classes (train.eval_media).
  media_fn = None
  # Configs without the field (the captioner, the classifier) have nothing to sample.
  if eval_every and media_sampler is not None and config.train.get("eval_media", False):
    if jax.process_count() == 1:
      media_fn = media_sampler(config, model)
    elif jax.process_index() == 0:
      print("train.eval_media: TensorBoard samples are written by single-process runs only", flush=True)

  # ------------------------------------------------------------------- loop
  step = int(jax.device_get(state.step))
  total = config.train.steps
  if jax.process_index() == 0:
    print(f"{config.task}: {num_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, steps {step}->{total}", flush=True)
  last = {}
  scores, scores_step = None, None

  def save(force=False):
    nonlocal scores, scores_step
    extras = None
    if extras_fn is not None:
      if scores_step != step:
        scores, scores_step = evaluate(state.ema_params), step
      extras = extras_fn(scores, config)
    return checkpoint.save(manager, step, state, _IteratorSnapshot(data_iter), config, force=force, extras=extras)

  preemption = _Preemption(step, config.train.log_every)
  skips = _SkipGuard(int(config.train.max_consecutive_skips), workdir, manager)
  profile_start, profile_stop = tuple(config.train.profile_steps)
  profiling = False
  try:
    window_start, window_steps, window_examples, window_tokens, window_flops = time.time(), 0, 0, 0, 0.0
    model_flops_fn = getattr(task, "model_flops", None)
    while step < total:
      if step == profile_start < profile_stop:
        jax.profiler.start_trace(paths.join(workdir, "profile"))  # TensorBoard's profile tab reads it
        profiling = True
      local = next(data_iter)
      batch = pipeline.make_global_batch(local, batch_sharding)
      with sharding.activate(mesh, rules):
        if compiled is None:
          compiled = step_fn.lower(state, batch).compile()
          flops_per_step = metrics.step_flops(compiled, mesh.size)
          window_start = time.time()  # the first window's rates leave out compilation
        state, aux = compiled(state, batch)
      step += 1
      skips.push(aux["skipped"], step)
      window_steps += 1
      examples, tokens = _count_examples_and_tokens(local)
      window_examples += examples * jax.process_count()
      window_tokens += tokens * jax.process_count()
      if model_flops_fn is not None:  # None for a batch the task has no count for: XLA's count below
        window_flops += (model_flops_fn(config, local) or 0.0) * jax.process_count()
      saved_now = False
      if profiling and step >= profile_stop:
        jax.block_until_ready(aux)
        jax.profiler.stop_trace()
        profiling = False

      if step % config.train.log_every == 0 or step == total:
        skips.settle()
        aux = jax.device_get(aux)
        elapsed = time.time() - window_start
        steps_per_s = window_steps / elapsed
        last = dict(aux, steps_per_s=steps_per_s, examples_per_s=window_examples / elapsed,
                    tokens_per_s=window_tokens / elapsed, eta_s=(total - step) / steps_per_s)
        # MFU = model FLOPs / time / peak: the task's analytic count where it has one (XLA's count of
        # a scanned model sees one layer), else XLA's count of the compiled step.
        step_model_flops = window_flops / window_steps if window_flops else flops_per_step
        utilisation = metrics.mfu(step_model_flops, steps_per_s, mesh.size, peak_per_device)
        if utilisation is not None:
          last.update(mfu=utilisation, flops_per_step=step_model_flops)
        writer.write(step, last)
        shown = ("loss", "grad_norm", "steps_per_s", "tokens_per_s", "mfu", "skipped_steps")
        writer.progress(step, {k: last[k] for k in shown if k in last}, eta_s=last["eta_s"])
        window_start, window_steps, window_examples, window_tokens, window_flops = time.time(), 0, 0, 0, 0.0

      if eval_every and step % eval_every == 0:
        eval_start = time.time()
        scores, scores_step = evaluate(state.ema_params), step
        last.update(scores)  # the caller's last metrics include the newest held-out scores
        writer.write(step, scores)
        writer.progress(step, {"eval/loss": scores["eval/loss"]})
        if media_fn is not None:
          with sharding.activate(mesh, rules):
            writer.write_media(step, media_fn(state.ema_params, step))
        window_start += time.time() - eval_start  # the throughput rates leave out evaluation

      if step == total or (config.train.ckpt_every and step % config.train.ckpt_every == 0):
        skips.settle()  # never save a run that has just diverged
        saved_now = save()

      if test_signal is not None and step == test_signal[0]:
        os.kill(os.getpid(), test_signal[1])

      if preemption.should_stop(step) and step < total:
        skips.settle()
        if not saved_now:
          save(force=True)
        manager.wait_until_finished()
        if jax.process_index() == 0:
          print(f"preempted: saved step {step} in {workdir}; run the same command to resume", flush=True)
        break
    skips.settle()
  finally:
    if profiling:
      jax.profiler.stop_trace()
    preemption.close()
    manager.wait_until_finished()
    checkpoint.seal(manager)
    manager.close()
    writer.close()
  return state, {k: float(v) for k, v in last.items()}
