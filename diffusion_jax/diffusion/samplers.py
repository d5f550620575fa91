"""Samplers: DDPM ancestral, DDIM (with SDEdit start), classifier-free guidance,
and the Euler sampler of rectified flow.

Each sampler runs its whole loop as one `jax.lax.scan`, so a jitted call
compiles the model once, whatever the number of steps:

  sample = jax.jit(lambda noise, rng: ddim_sample(s, model_fn, noise, rng, num_steps=50,
                                                  prediction="eps", learn_sigma=True))

`model_fn(x_t, t)` takes packed tokens x_t [B, L, P] and per-token timesteps
t [B, L] int32 and returns [B, L, P] (or [B, L, 2P] with learn_sigma). For data
of another rank (images x [B, H, W, C]) t is per example, [B].

Frame conditioning (image-to-video, extension, interpolation): keep_mask [B, L]
bool marks tokens held clean at keep_x0 [B, L, P]. At every step the model sees
them with their clean value and t = 0, the DDPM/Sora convention for context
frames, and the sampler returns them unchanged.
"""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import objectives
from diffusion_jax.diffusion import schedules as sched


def _time_shape(x):
  """Per-token times for packed tokens [B, L, P], per-example times otherwise."""
  return x.shape[:2] if x.ndim == 3 else x.shape[:1]


def _check_keep(x, keep_mask, keep_x0):
  if (keep_mask is None) != (keep_x0 is None):
    raise ValueError("keep_mask and keep_x0 must be given together")
  if keep_mask is None:
    return
  if tuple(keep_mask.shape) != tuple(_time_shape(x)):
    raise ValueError(f"keep_mask of shape {keep_mask.shape} must be {_time_shape(x)} for x {x.shape}")
  if tuple(keep_x0.shape) != tuple(x.shape):
    raise ValueError(f"keep_x0 of shape {keep_x0.shape} must have the shape of x {x.shape}")


def _hold(x, keep_mask, keep_x0):
  """x with the kept tokens replaced by their clean value."""
  if keep_mask is None:
    return x
  mask = keep_mask.reshape(keep_mask.shape + (1,) * (x.ndim - keep_mask.ndim))
  return jnp.where(mask, keep_x0.astype(x.dtype), x)


def _model_inputs(x, t, keep_mask, keep_x0):
  """(x, t) as the model sees them: kept tokens clean and at t = 0."""
  if keep_mask is None:
    return x, t
  return _hold(x, keep_mask, keep_x0), jnp.where(keep_mask, jnp.zeros_like(t), t)


def _check_output(out, x, learn_sigma):
  expected = 2 * x.shape[-1] if learn_sigma else x.shape[-1]
  if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != expected:
    raise ValueError(
        f"model_fn returned shape {out.shape} for x {x.shape} with learn_sigma={learn_sigma} "
        f"(expected {expected} channels on the last axis)")


def ddpm_sample(s, model_fn, noise, rng, *, prediction, learn_sigma, clip_x0=None,
                keep_mask=None, keep_x0=None, start_step=None):
  """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) from t = T-1 (or start_step) down to 0.

  x_{t-1} = mean + sigma_t z with mean and variance from `objectives.p_mean_variance`
  (learned range with learn_sigma, else fixed small beta-tilde); no noise at t = 0.
  `noise` is x_{T-1}, the starting standard Gaussian. Returns the sample x_{-1} = x0.

  SDEdit: `start_step` k (an int, or an int array of the time shape: one start per
  token) means `noise` is x_k and a token's steps run from its own k down to 0; a
  token waits at x_k, seen by the model at time k, until the loop reaches k. Step
  t always draws its noise from the same key, whatever the start.
  """
  _check_keep(noise, keep_mask, keep_x0)
  keys = jax.random.split(rng, s.num_steps)
  time_shape = _time_shape(noise)
  first = 0
  if start_step is None or isinstance(start_step, (int, np.integer)):
    start = s.num_steps - 1 if start_step is None else int(start_step)
    if not 0 <= start < s.num_steps:
      raise ValueError(f"start_step must be in [0, {s.num_steps - 1}], got {start}")
    first = s.num_steps - 1 - start  # a scalar start skips the steps above it
  else:
    start = jnp.broadcast_to(jnp.asarray(start_step, jnp.int32), time_shape)
  timesteps = jnp.asarray(np.arange(s.num_steps - 1 - first, -1, -1), jnp.int32)

  def step(x, inputs):
    t_now, key = inputs
    active = t_now <= start
    t = jnp.minimum(jnp.full(time_shape, t_now, jnp.int32), start)
    x_in, t_in = _model_inputs(x, t, keep_mask, keep_x0)
    out = model_fn(x_in, t_in)
    _check_output(out, x, learn_sigma)
    p = objectives.p_mean_variance(
        s, out, x_in, t, prediction=prediction, learn_sigma=learn_sigma, clip_x0=clip_x0)
    std = jnp.where(t_now > 0, jnp.exp(0.5 * p["log_variance"]), 0.0)
    x_next = p["mean"] + std * jax.random.normal(key, x.shape, x.dtype)
    x_next = jnp.where(_expand(active, x), x_next.astype(x.dtype), x)
    return _hold(x_next, keep_mask, keep_x0), None

  x, _ = jax.lax.scan(step, _hold(noise, keep_mask, keep_x0), (timesteps, keys[first:]))
  return x


def _expand(mask, x):
  """A per-token (or per-example) mask broadcast against x."""
  mask = jnp.asarray(mask)
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def ddim_timesteps(total_steps: int, num_steps: int, start_step=None) -> np.ndarray:
  """Descending DDIM timesteps, evenly spaced and 'trailing' (diffusers' name).

  With m = start_step + 1 (default start_step = T - 1): t_i = floor(m (n - i) / n) - 1
  for i = 0..n-1, so the first step is start_step itself (pure noise when it is
  T - 1) and the last is floor(m / n) - 1. Lin et al. 2024 show 'leading' spacing
  never starts from the last timestep; floor instead of round keeps steps distinct.
  num_steps == start_step + 1 gives every step.
  """
  if start_step is None:
    start_step = total_steps - 1
  if not 0 <= start_step < total_steps:
    raise ValueError(f"start_step must be in [0, {total_steps - 1}], got {start_step}")
  m = start_step + 1
  if not 1 <= num_steps <= m:
    raise ValueError(f"num_steps must be in [1, {m}] (start_step + 1), got {num_steps}")
  i = np.arange(num_steps)
  return ((m * (num_steps - i)) // num_steps - 1).astype(np.int32)


def ddim_coefficients(s, t, t_prev, eta):
  """(sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2), sigma) of the DDIM step t -> t_prev.

  Song et al. 2021, eq. 12 and 16:
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev),
  with abar_prev = 1 for t_prev = -1 (the final step to x0). With eta = 1 and
  t_prev = t - 1, sigma^2 is DDPM's posterior variance beta-tilde_t. The factor
  1 - abar_t / abar_prev = 1 - prod(1 - beta) over (t_prev, t] is summed in log
  space from the betas, and 1 - abar from its float64-built square root, so float32
  keeps its precision near t = 0 where abar is within 1e-4 of 1.
  """
  t = jnp.asarray(t, jnp.int32)
  t_prev = jnp.asarray(t_prev, jnp.int32)
  steps = jnp.arange(s.num_steps)
  in_range = (steps > t_prev[..., None]) & (steps <= t[..., None])
  log_ratio = jnp.sum(jnp.where(in_range, jnp.log1p(-s.betas), 0.0), axis=-1)
  one_minus_ratio = -jnp.expm1(log_ratio)
  has_prev = t_prev >= 0
  prev = jnp.maximum(t_prev, 0)
  one_minus_abar = jnp.square(s.sqrt_one_minus_alphas_cumprod[t])
  one_minus_abar_prev = jnp.where(has_prev, jnp.square(s.sqrt_one_minus_alphas_cumprod[prev]), 0.0)
  sqrt_abar_prev = jnp.where(has_prev, s.sqrt_alphas_cumprod[prev], 1.0)
  sigma = eta * jnp.sqrt(one_minus_abar_prev / one_minus_abar * one_minus_ratio)
  direction = jnp.sqrt(jnp.maximum(one_minus_abar_prev - jnp.square(sigma), 0.0))
  return sqrt_abar_prev, direction, sigma


def ddim_token_timesteps(total_steps: int, num_steps: int, start_steps):
  """Per-token DDIM grids [num_steps + 1, *start_steps.shape]: row i is ddim_timesteps' t_i
  for each token's own start step k (t_i = floor((k + 1)(n - i) / n) - 1), row n is -1 (x0).

  A token whose k + 1 < num_steps repeats some times (those steps leave it as it is) and
  reaches -1 early (done: held from then on), so one call mixes SDEdit strengths.
  """
  start = jnp.clip(jnp.asarray(start_steps, jnp.int32), 0, total_steps - 1)
  i = jnp.arange(num_steps + 1, dtype=jnp.int32).reshape((-1,) + (1,) * start.ndim)
  return ((start + 1) * (num_steps - i)) // num_steps - 1


def ddim_sample(s, model_fn, noise, rng, *, num_steps, eta=0.0, prediction, learn_sigma,
                clip_x0=None, keep_mask=None, keep_x0=None, start_step=None):
  """DDIM sampling (Song et al. 2021) over `ddim_timesteps(T, num_steps, start_step)`.

  eta = 0 is the deterministic DDIM; eta = 1 with num_steps == T is DDPM ancestral
  sampling with fixed-small variance. Learned-variance channels are ignored (the
  variance comes from eta), as in Improved DDPM's and DiT's `ddim_sample`.
  When clipping, eps is recomputed from the clipped x0. `rng` may be None when eta == 0.

  SDEdit (Meng et al. 2022): with `start_step` = k, `noise` is x_k, e.g.
  `q_sample(s, x_edit, k, eps)`, and sampling runs from k down to 0. `start_step`
  may also be an int array of the time shape, one start per token: each token then
  walks its own grid (ddim_token_timesteps) in the same num_steps model calls.
  """
  _check_keep(noise, keep_mask, keep_x0)
  time_shape = _time_shape(noise)
  if start_step is None or isinstance(start_step, (int, np.integer)):
    grid = np.append(ddim_timesteps(s.num_steps, num_steps, start_step), -1).astype(np.int32)
    grid = jnp.broadcast_to(jnp.asarray(grid).reshape((-1,) + (1,) * len(time_shape)),
                            (num_steps + 1,) + tuple(time_shape))
  else:
    if not 1 <= num_steps:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = ddim_token_timesteps(s.num_steps, num_steps, jnp.broadcast_to(start_step, time_shape))
  deterministic = rng is None
  if deterministic:
    if not (isinstance(eta, (int, float)) and eta == 0):
      raise ValueError("ddim_sample needs an rng unless eta == 0")
    keys = jnp.zeros((num_steps,), jnp.uint32)  # placeholder scan input, never used
  else:
    keys = jax.random.split(rng, num_steps)
  channels = noise.shape[-1]

  def step(x, inputs):
    t_now, t_prev, key = inputs
    moves = t_now > t_prev  # repeated times (small SDEdit starts) and finished tokens stay
    t = jnp.maximum(t_now, 0)
    x_in, t_in = _model_inputs(x, t, keep_mask, keep_x0)
    out = model_fn(x_in, t_in)
    _check_output(out, x, learn_sigma)
    pred_x0, eps = objectives.model_output_to_x0_eps(s, out[..., :channels], x_in, t, prediction)
    if clip_x0 is not None:
      pred_x0 = jnp.clip(pred_x0, *clip_x0)
      eps = sched.predict_eps_from_x0(s, x_in, t, pred_x0)
    sqrt_abar_prev, direction, sigma = (_expand(c, x) for c in ddim_coefficients(s, t, t_prev, eta))
    x_next = sqrt_abar_prev * pred_x0 + direction * eps
    if not deterministic:
      x_next = x_next + sigma * jax.random.normal(key, x.shape, x.dtype)
    x_next = jnp.where(_expand(moves, x), x_next.astype(x.dtype), x)
    return _hold(x_next, keep_mask, keep_x0), None

  x, _ = jax.lax.scan(step, _hold(noise, keep_mask, keep_x0), (grid[:-1], grid[1:], keys))
  return x


def guided_model_fn(apply_fn, labels, null_labels, scale, learn_sigma):
  """Classifier-free guidance (Ho & Salimans 2022) as a `model_fn(x, t)`.

  Runs apply_fn(x, t, labels) for the conditional and the unconditional labels
  as ONE batch of 2B (concatenated along B), then returns
  out_u + scale (out_c - out_u) on the P prediction channels and, with
  learn_sigma, the conditional learned-variance channels unchanged. Guidance is
  affine, so it means the same for eps, v or x0 prediction. scale = 1 is the
  conditional model, scale = 0 the unconditional one.
  apply_fn(x [B, L, P], t [B, L], labels [B, K]) -> [B, L, P or 2P].
  """
  labels = jnp.asarray(labels)
  null_labels = jnp.broadcast_to(jnp.asarray(null_labels, labels.dtype), labels.shape)
  both_labels = jnp.concatenate([labels, null_labels], axis=0)

  def model_fn(x, t):
    x_both = jnp.concatenate([x, x], axis=0)
    out = apply_fn(x_both, jnp.concatenate([t, t], axis=0), both_labels)
    _check_output(out, x_both, learn_sigma)
    cond, uncond = jnp.split(out, 2, axis=0)
    channels = x.shape[-1]
    guided = uncond[..., :channels] + scale * (cond[..., :channels] - uncond[..., :channels])
    if learn_sigma:
      return jnp.concatenate([guided, cond[..., channels:]], axis=-1)
    return guided

  return model_fn


def flow_time_grid(num_steps: int, start, shift=1.0):
  """Per-token time grids [num_steps + 1, *start.shape] for flow_sample.

  Token times go from `start` (1 = pure noise; < 1 for SDEdit, the edit
  strength) down to 0 on a uniform grid, then through the resolution shift
  t' = shift t / (1 + (shift - 1) t) (shift broadcastable to start; a larger
  shift spends more steps at high noise, which large, long clips need: SD3).
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  fractions = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  start = jnp.asarray(start, jnp.float32)
  grid = fractions.reshape((-1,) + (1,) * start.ndim) * start
  return objectives.shift_times(grid, jnp.asarray(shift, jnp.float32))


def flow_sample(model_fn, x_init, times, *, method="euler", keep_mask=None, keep_x0=None):
  """Integrates a rectified-flow ODE dx/dt = v(x, t) along per-token times.

  x_init [B, L, P] is x at times[0] (noise, or for SDEdit (1 - s) x_edit + s noise);
  times [n + 1, B, L] decrease to 0 (flow_time_grid). Each token moves on its
  own clock, so one packed call mixes sizes, durations, edit strengths and
  kept (conditioning) tokens. model_fn(x [B, L, P], t [B, L]) -> v.
  method 'euler': x <- x + (t' - t) v(x, t). 'heun' (Karras et al. 2022):
  the trapezoid of v(x, t) and v(x_euler, t'), Euler on a step that ends at
  t' = 0 (as EDM's second-order sampler), so it costs 2n - 1 model calls.
  Kept tokens are held at keep_x0 and seen at t = 0.
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"unknown flow sampler method {method!r}; use euler or heun")
  _check_keep(x_init, keep_mask, keep_x0)
  times = jnp.asarray(times, jnp.float32)
  if times.shape[1:] != x_init.shape[:2] or times.shape[0] < 2:
    raise ValueError(f"times must be [n + 1, B, L] with B, L of x {x_init.shape}; got {times.shape}")

  def velocity(x, t):
    x_in, t_in = _model_inputs(x, t, keep_mask, keep_x0)
    v = model_fn(x_in, t_in)
    if v.shape != x.shape:
      raise ValueError(f"model_fn returned shape {v.shape} for x {x.shape}")
    return v

  def step(x, inputs):
    t_now, t_next = inputs
    dt = (t_next - t_now)[..., None]
    v = velocity(x, t_now)
    x_euler = x + dt * v
    if method == "heun":
      last = jnp.all(t_next <= 0)
      x_next = jax.lax.cond(last, lambda: x_euler,
                            lambda: x + dt * 0.5 * (v + velocity(_hold(x_euler, keep_mask, keep_x0), t_next)))
    else:
      x_next = x_euler
    return _hold(x_next.astype(x.dtype), keep_mask, keep_x0), None

  x, _ = jax.lax.scan(step, _hold(x_init, keep_mask, keep_x0), (times[:-1], times[1:]))
  return x
