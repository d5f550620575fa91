"""Discrete DDPM noise schedules and the closed forms of the forward process.

Conventions (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021, "Improved DDPM"):

- Timesteps are 0-indexed, t in 0..T-1. x_t is x_0 after t + 1 noising steps,
  so alphas_cumprod[t] = prod_{i <= t} (1 - betas[i]) and q(x_t | x_0) =
  N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I).
- Coefficients are computed in float64 numpy and stored as float32 jnp arrays.
- Shapes: the data are packed token rows x [B, L, P] with a timestep per token,
  t [B, L] int32; a timestep per example t [B] with x [B, ...] works as well.
  `_extract` gathers the coefficient of each timestep and appends size-1 axes
  so it broadcasts against x. Out-of-range timesteps are clamped by the gather
  (JAX indexing semantics); callers draw them in 0..T-1.
"""
import flax.struct
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "quadratic", "cosine")


def beta_schedule(kind: str, num_steps: int) -> np.ndarray:
  """Returns the float64 betas of `kind` for `num_steps` steps.

  - 'linear': DDPM's 1e-4..0.02 for 1000 steps; both ends are scaled by
    1000 / num_steps (Improved DDPM's `get_named_beta_schedule`), so the total
    amount of noise stays about the same for any number of steps.
  - 'quadratic': linspace of sqrt(beta) from sqrt(0.00085) to sqrt(0.012), squared
    (Latent Diffusion / Stable Diffusion's "scaled_linear").
  - 'cosine': Nichol & Dhariwal's alpha_bar(t) = cos^2(((t / T + s) / (1 + s)) pi / 2)
    with s = 0.008; beta_i = 1 - alpha_bar(i + 1) / alpha_bar(i), clipped at 0.999.
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  if kind == "linear":
    scale = 1000.0 / num_steps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  elif kind == "quadratic":
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), num_steps, dtype=np.float64) ** 2
  elif kind == "cosine":
    s = 0.008
    grid = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    alpha_bar = np.cos((grid + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
  else:
    raise ValueError(f"Unknown beta schedule {kind!r}; valid kinds are {', '.join(SCHEDULE_KINDS)}")
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError(
        f"The {kind!r} schedule with num_steps={num_steps} gives betas outside (0, 1) "
        f"(max {betas.max():.4g}); use more steps")
  return betas


@flax.struct.dataclass
class Schedule:
  """All per-timestep coefficients of a discrete schedule, each a float32 [T] array.

  A pytree, so it can be passed through `jax.jit`; `num_steps` is static.
  posterior_* describe q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance).
  posterior_variance[0] is 0 (x_{-1} is x_0), so its log is clipped to the value
  at t = 1, as in DDPM's and Improved DDPM's code.
  """
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray
  num_steps: int = flax.struct.field(pytree_node=False)


def make_schedule(kind: str, num_steps: int) -> Schedule:
  """Builds a `Schedule` from `beta_schedule(kind, num_steps)` (float64 math, float32 storage)."""
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
    raise ValueError(f"A diffusion schedule needs num_steps >= 2, got {num_steps!r}")
  betas = beta_schedule(kind, num_steps)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      betas=f32(betas),
      alphas_cumprod=f32(abar),
      alphas_cumprod_prev=f32(abar_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(abar)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / abar)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / abar - 1.0)),
      posterior_variance=f32(posterior_variance),
      posterior_log_variance_clipped=f32(
          np.log(np.append(posterior_variance[1], posterior_variance[1:]))),
      posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
      posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
      num_steps=int(num_steps),
  )


def _extract(arr, t, ndim: int):
  """arr[t] with size-1 axes appended so it broadcasts against an array of rank `ndim`.

  t is [B, L] (per token, for x [B, L, P]) or [B] (per example, for x [B, ...]).
  """
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"Discrete timesteps must be integers, got dtype {t.dtype}")
  if t.ndim > ndim:
    raise ValueError(f"Timesteps of shape {t.shape} have more axes than the data (rank {ndim})")
  values = jnp.take(arr, t, mode="clip")
  return values.reshape(t.shape + (1,) * (ndim - t.ndim))


def _check_leading(x, t, name="x"):
  t_shape, x_shape = jnp.shape(t), jnp.shape(x)
  if x_shape[:len(t_shape)] != tuple(t_shape):
    raise ValueError(
        f"Timesteps of shape {tuple(t_shape)} must match the leading axes of {name} "
        f"of shape {tuple(x_shape)} ([B, L] for [B, L, P] tokens, or [B] for [B, ...])")


def q_sample(s: Schedule, x0, t, noise):
  """Draws x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
  _check_leading(x0, t, "x0")
  return (_extract(s.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_mean_variance(s: Schedule, x0, t):
  """(mean, variance, log_variance) of q(x_t | x_0); variance and log broadcast against x0."""
  _check_leading(x0, t, "x0")
  mean = _extract(s.sqrt_alphas_cumprod, t, x0.ndim) * x0
  variance = _extract(1.0 - s.alphas_cumprod, t, x0.ndim)
  log_variance = jnp.log(variance)
  return mean, variance, log_variance


def q_posterior(s: Schedule, x0, x_t, t):
  """(mean, variance, log_variance_clipped) of q(x_{t-1} | x_t, x_0)."""
  _check_leading(x_t, t, "x_t")
  ndim = x_t.ndim
  mean = (_extract(s.posterior_mean_coef1, t, ndim) * x0
          + _extract(s.posterior_mean_coef2, t, ndim) * x_t)
  variance = _extract(s.posterior_variance, t, ndim)
  log_variance = _extract(s.posterior_log_variance_clipped, t, ndim)
  return mean, variance, log_variance


# Conversions between the three parameterisations. With a = sqrt(abar_t) and
# b = sqrt(1 - abar_t): x_t = a x0 + b eps, and v = a eps - b x0 (Salimans & Ho 2022).


def predict_x0_from_eps(s: Schedule, x_t, t, eps):
  """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
  _check_leading(x_t, t, "x_t")
  return (_extract(s.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
          - _extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(s: Schedule, x_t, t, x0):
  """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
  _check_leading(x_t, t, "x_t")
  return ((_extract(s.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
          / _extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def v_target(s: Schedule, x0, noise, t):
  """The v-prediction target v = sqrt(abar) noise - sqrt(1 - abar) x0."""
  _check_leading(x0, t, "x0")
  return (_extract(s.sqrt_alphas_cumprod, t, x0.ndim) * noise
          - _extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(s: Schedule, x_t, t, v):
  """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
  _check_leading(x_t, t, "x_t")
  return (_extract(s.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
          - _extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def predict_eps_from_v(s: Schedule, x_t, t, v):
  """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
  _check_leading(x_t, t, "x_t")
  return (_extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
          + _extract(s.sqrt_alphas_cumprod, t, x_t.ndim) * v)
