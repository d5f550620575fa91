"""The two diffusion objectives behind one interface, chosen by config.diffusion.kind.

  ddpm  discrete timesteps of a beta schedule, eps / v / x0 prediction, learned
        variance (the image DiT's objective); samplers 'ddim' and 'ddpm'.
  flow  rectified flow, the video default: x_t = (1 - t) x0 + t noise, the model
        predicts v = noise - x0 and sees 1000 t. Times are logit-normal (SD3) and
        shifted per example by s = sqrt(n / diffusion.shift_base_tokens), n the
        example's own token count (frames x height x width), so large and long
        clips train at more noise, as they need (SD3's resolution shift, applied
        to duration too as Open-Sora does); samplers 'euler' and 'heun'.

Both work on packed rows (x [B, L, P], segment_ids [B, L], K examples a row) and offer:

  sample_times(rng, segment_ids, K) -> [B, K]   one training time per example
  corrupt(x0, noise, t, cond_mask) -> (x_t, model_time)
                                     t [B, L] per token (conditioning tokens at 0, kept clean)
  token_loss(out, x0, x_t, t, noise) -> [B, L]  the per-token loss of a model output
  timestep_index(t_example) -> int [B, K]       the time on a grid of num_timesteps steps
                                                (for the loss-by-noise-level buckets)
  sample(model_fn, given, noise, rng, ...)      the matching sampler; model_fn(x, model_time)
  samplers, learn_sigma, num_timesteps
"""
import jax
import jax.numpy as jnp

from diffusion_jax.config import ConfigError
from diffusion_jax.diffusion import objectives, samplers, schedules

KINDS = ("ddpm", "flow")


def kind_of(config) -> str:
  return config.diffusion.kind


def validate(config) -> None:
  """The diffusion section's checks: a known kind, and what that kind's model must predict."""
  kind = kind_of(config)
  if kind not in KINDS:
    raise ConfigError(f"unknown diffusion.kind {kind!r}; use one of {KINDS}")
  if kind == "flow" and config.model.learn_sigma:
    raise ConfigError("diffusion.kind='flow' predicts a velocity: set model.learn_sigma=False")
  if kind == "ddpm" and config.diffusion.prediction not in objectives.PREDICTIONS:
    raise ConfigError(f"unknown diffusion.prediction {config.diffusion.prediction!r}; use eps, v or x0")


def make_objective(config):
  """The objective of config.diffusion.kind."""
  if kind_of(config) == "flow":
    flow = config.diffusion
    return FlowObjective(logit_mean=float(flow.logit_mean), logit_std=float(flow.logit_std),
                         shift_base_tokens=float(flow.shift_base_tokens))
  latent = config.get("latent", {}) or {}  # only a model trained on an encoded dataset has one
  return DdpmObjective(
      schedule=schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_steps),
      prediction=config.diffusion.prediction, learn_sigma=bool(config.model.learn_sigma),
      # Pixels live in [-1, 1]: DiT clips the predicted x0 there. Normalised latents have no such bound.
      clip_x0=None if latent.get("vae", "") else (-1.0, 1.0))


def _check_sampler(objective, sampler: str) -> None:
  if sampler not in objective.samplers:
    raise ValueError(f"a {objective.kind} model samples with {' or '.join(objective.samplers)}, not {sampler!r}")


class DdpmObjective:
  kind = "ddpm"
  samplers = ("ddim", "ddpm")

  def __init__(self, schedule, prediction: str, learn_sigma: bool, clip_x0=None):
    self.schedule = schedule
    self.prediction = prediction
    self.learn_sigma = learn_sigma
    self.clip_x0 = clip_x0
    self.num_timesteps = schedule.num_steps

  def sample_times(self, rng, segment_ids, num_examples: int):
    return jax.random.randint(rng, (segment_ids.shape[0], num_examples), 0, self.schedule.num_steps)

  def corrupt(self, x0, noise, t, cond_mask):
    x_t = schedules.q_sample(self.schedule, x0, t, noise)
    return jnp.where(cond_mask[..., None], x0, x_t), t

  def token_loss(self, out, x0, x_t, t, noise):
    return objectives.per_token_loss(self.schedule, out, x0, x_t, t, noise, prediction=self.prediction,
                                     learn_sigma=self.learn_sigma)

  def timestep_index(self, t_example):
    return t_example

  def sample(self, model_fn, given, noise, rng, *, segment_ids, cond_mask, strength, sampler, steps, eta):
    """'ddpm' ancestral or 'ddim' from `noise`; SDEdit per example: each example's `strength`
    s starts its tokens at step k = round(s (T - 1)) from q_sample(x_edit, k) (s = 1: pure noise)."""
    _check_sampler(self, sampler)
    top = self.num_timesteps - 1
    start = objectives.per_token(jnp.round(strength * top).astype(jnp.int32), segment_ids)
    x_init = jnp.where((start < top)[..., None], schedules.q_sample(self.schedule, given, start, noise), noise)
    common = dict(prediction=self.prediction, learn_sigma=self.learn_sigma, clip_x0=self.clip_x0,
                  keep_mask=cond_mask, keep_x0=given, start_step=start)
    if sampler == "ddpm":
      return samplers.ddpm_sample(self.schedule, model_fn, x_init, rng, **common)
    return samplers.ddim_sample(self.schedule, model_fn, x_init, rng if eta else None, num_steps=steps, eta=eta,
                                **common)


class FlowObjective:
  kind = "flow"
  samplers = ("euler", "heun")
  learn_sigma = False
  num_timesteps = 1000  # the model's clock: it sees 1000 t

  def __init__(self, logit_mean: float, logit_std: float, shift_base_tokens: float):
    self.logit_mean = logit_mean
    self.logit_std = logit_std
    self.shift_base_tokens = shift_base_tokens

  def shift(self, segment_ids, num_examples: int):
    """[B, K] resolution/duration shift s = sqrt(n / shift_base_tokens) (1 when the base is 0)."""
    if self.shift_base_tokens <= 0:
      return jnp.ones(segment_ids.shape[:1] + (num_examples,), jnp.float32)
    counts = objectives.example_token_counts(segment_ids, num_examples).astype(jnp.float32)
    return jnp.sqrt(jnp.maximum(counts, 1.0) / self.shift_base_tokens)

  def sample_times(self, rng, segment_ids, num_examples: int):
    t = objectives.logit_normal_times(rng, (segment_ids.shape[0], num_examples), self.logit_mean, self.logit_std)
    return objectives.shift_times(t, self.shift(segment_ids, num_examples))

  def corrupt(self, x0, noise, t, cond_mask):
    del cond_mask  # at t = 0 the interpolation is x0 itself
    x_t, _ = objectives.flow_interpolate(x0, noise, t)
    return x_t, self.num_timesteps * t

  def token_loss(self, out, x0, x_t, t, noise):
    del x_t, t
    return objectives.flow_loss_per_token(out, x0, noise)

  def timestep_index(self, t_example):
    return jnp.minimum((t_example * self.num_timesteps).astype(jnp.int32), self.num_timesteps - 1)

  def sample(self, model_fn, given, noise, rng, *, segment_ids, cond_mask, strength, sampler, steps, eta):
    """Per-token clocks from each example's `strength` (1 = pure noise, s < 1 = SDEdit from
    (1 - s) x_edit + s noise) down to 0, shifted by each example's own token count."""
    del rng, eta  # a deterministic ODE
    _check_sampler(self, sampler)
    num_examples = strength.shape[1]
    start = objectives.per_token(strength, segment_ids)
    times = samplers.flow_time_grid(steps, start, objectives.per_token(self.shift(segment_ids, num_examples),
                                                                       segment_ids))
    x_init = (1.0 - start[..., None]) * given + start[..., None] * noise
    return samplers.flow_sample(lambda x, t: model_fn(x, self.num_timesteps * t), x_init, times, method=sampler,
                                keep_mask=cond_mask, keep_x0=given)
