"""Training targets and losses: eps / v / x0 prediction, the learned-variance
variational bound, per-example loss reduction over packed rows, and rectified flow.

Shapes follow schedules.py: x [B, L, P] with per-token t [B, L] (or x [B, ...]
with t [B]). "Per token" losses average over the axes of x after those of t
(P for packed tokens; H, W, C for images, as DiT's `mean_flat`).
"""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import schedules as sched

PREDICTIONS = ("eps", "v", "x0")


def _check_prediction(prediction):
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; valid ones are {', '.join(PREDICTIONS)}")


def _split_output(model_output, x_t, learn_sigma):
  """Splits the model output into (prediction, variance values or None) and checks channels."""
  channels = x_t.shape[-1]
  expected = 2 * channels if learn_sigma else channels
  if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != expected:
    raise ValueError(
        f"Model output of shape {model_output.shape} does not fit x_t of shape {x_t.shape} "
        f"with learn_sigma={learn_sigma} (expected {expected} channels on the last axis)")
  if learn_sigma:
    return model_output[..., :channels], model_output[..., channels:]
  return model_output, None


def _token_mean(x, t):
  """Mean over the axes of x that come after the axes of t."""
  return jnp.mean(x, axis=tuple(range(jnp.ndim(t), x.ndim)))


def model_output_to_x0_eps(s, out, x_t, t, prediction):
  """(x0, eps) implied by the prediction channels `out` of a model ('eps', 'v' or 'x0')."""
  _check_prediction(prediction)
  if prediction == "eps":
    return sched.predict_x0_from_eps(s, x_t, t, out), out
  if prediction == "v":
    return sched.predict_x0_from_v(s, x_t, t, out), sched.predict_eps_from_v(s, x_t, t, out)
  return out, sched.predict_eps_from_x0(s, x_t, t, out)


def p_mean_variance(s, model_output, x_t, t, *, prediction, learn_sigma, clip_x0=None):
  """The reverse step p(x_{t-1} | x_t) = N(mean, variance) implied by a model output.

  The mean is the posterior mean q(x_{t-1} | x_t, x0 = pred_x0), with pred_x0
  clipped to `clip_x0` = (lo, hi) first when given.

  Variance:
  - learn_sigma: the last axis holds 2P channels; the second half v in [-1, 1]
    interpolates the log variance between the posterior's (beta-tilde, clipped at
    t = 0) and log(beta_t): Improved DDPM's "learned range", used by DiT.
  - otherwise: fixed to the posterior variance beta-tilde_t ("fixed small", DDPM's
    sigma_t^2 = beta-tilde_t option). Note DiT/guided-diffusion with learn_sigma off
    default to "fixed large" (beta_t) instead; the two sample alike for many steps.

  Returns dict(mean, variance, log_variance, pred_x0).
  """
  pred, var_values = _split_output(model_output, x_t, learn_sigma)
  if learn_sigma:
    min_log = sched._extract(s.posterior_log_variance_clipped, t, x_t.ndim)
    max_log = sched._extract(jnp.log(s.betas), t, x_t.ndim)
    frac = (var_values + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    variance = jnp.exp(log_variance)
  else:
    variance = jnp.broadcast_to(sched._extract(s.posterior_variance, t, x_t.ndim), x_t.shape)
    log_variance = jnp.broadcast_to(
        sched._extract(s.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape)
  pred_x0, _ = model_output_to_x0_eps(s, pred, x_t, t, prediction)
  if clip_x0 is not None:
    lo, hi = clip_x0
    pred_x0 = jnp.clip(pred_x0, lo, hi)
  mean, _, _ = sched.q_posterior(s, pred_x0, x_t, t)
  return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2).

  DDPM's decoder L_0: each bin is [x - 1/255, x + 1/255]; the outer bins extend
  to -inf and +inf. The reference code takes log(max(cdf difference, 1e-12)) with
  a tanh approximation of the normal CDF, which has no gradient once a bin is far
  in a tail; here the difference is taken in log space from the nearer tail,
  log(Phi(u) - Phi(l)) = log Phi(u) + log(1 - Phi(l) / Phi(u)) (mirrored for bins
  above the mean), so it stays exact and differentiable.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  upper = inv_std * (centered + 1.0 / 255.0)
  lower = inv_std * (centered - 1.0 / 255.0)
  log_ndtr = jax.scipy.special.log_ndtr

  def log_mass(hi, lo):  # log(Phi(hi) - Phi(lo)) for lo < hi, accurate when hi is not far above 0
    gap = jnp.minimum(log_ndtr(lo) - log_ndtr(hi), -1e-12)
    return log_ndtr(hi) + jnp.log(-jnp.expm1(gap))

  below_mean = (upper + lower) <= 0
  log_bin = jnp.where(below_mean, log_mass(upper, lower), log_mass(-lower, -upper))
  return jnp.where(x < -0.999, log_ndtr(upper), jnp.where(x > 0.999, log_ndtr(-lower), log_bin))


def prediction_target(s, x0, noise, t, prediction):
  """What the model regresses: noise ('eps'), v ('v') or x0 ('x0')."""
  _check_prediction(prediction)
  if prediction == "eps":
    return noise
  if prediction == "v":
    return sched.v_target(s, x0, noise, t)
  return x0


def per_token_loss(s, model_output, x0, x_t, t, noise, *, prediction, learn_sigma):
  """Per-token diffusion loss, [B, L] for tokens (or [B] for x [B, ...] with t [B]).

  Follows DiT's `GaussianDiffusion.training_losses` with loss_type MSE:
  loss = mse + vb, where mse is the squared error of the prediction target
  (eps / v / x0) averaged over the channels, and vb (only with learn_sigma) is
  the variational bound term in bits: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
  for t > 0 and the discretized Gaussian decoder NLL at t == 0, computed with the
  prediction channels behind stop_gradient, so vb trains only the variance channels
  (Improved DDPM's L_hybrid; no rescaling, as loss_type MSE, not RESCALED_MSE).
  The decoder NLL assumes data in [-1, 1] (256 bins), as DiT applies it to latents too.
  """
  pred, var_values = _split_output(model_output, x_t, learn_sigma)
  target = prediction_target(s, x0, noise, t, prediction)
  loss = _token_mean(jnp.square(target - pred), t)
  if learn_sigma:
    frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
    p = p_mean_variance(s, frozen, x_t, t, prediction=prediction, learn_sigma=True)
    true_mean, _, true_log_variance = sched.q_posterior(s, x0, x_t, t)
    kl = _token_mean(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]), t)
    nll = _token_mean(
        -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]), t)
    vb = jnp.where(t == 0, nll, kl) / np.log(2.0)
    loss = loss + vb
  return loss


def per_token(values, segment_ids):
  """Gathers per-example values [B, K, ...] to tokens [B, L, ...] (padding takes example 1's)."""
  index = jnp.maximum(segment_ids - 1, 0)
  index = index.reshape(index.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, index, axis=1)


def example_token_counts(segment_ids, num_examples: int):
  """[B, K] number of tokens of each example of each row."""
  ids = jnp.arange(1, num_examples + 1, dtype=segment_ids.dtype)
  return jnp.sum(segment_ids[..., None] == ids, axis=1)


def reduce_per_example(per_token, segment_ids, loss_mask, num_examples):
  """Scalar loss of a packed batch: every example counts once, whatever its size.

  For each example k in 1..num_examples of each row: the mean of `per_token`
  [B, L] over its tokens (segment_ids == k) with loss_mask [B, L] True; then the
  mean of those over all examples of the batch that have at least one such
  token. Padding (segment id 0), masked tokens (e.g. conditioning frames) and
  empty examples contribute nothing; values there may even be NaN. A batch
  without any loss token gives 0, not NaN.
  """
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
  if per_token.shape != segment_ids.shape or loss_mask.shape != segment_ids.shape:
    raise ValueError(
        f"per_token {per_token.shape}, segment_ids {segment_ids.shape} and loss_mask "
        f"{loss_mask.shape} must all be [B, L]")
  loss_mask = jnp.asarray(loss_mask).astype(bool)
  ids = jnp.arange(1, num_examples + 1, dtype=segment_ids.dtype)
  member = ((segment_ids[..., None] == ids) & loss_mask[..., None]).astype(jnp.float32)  # [B,L,K]
  safe = jnp.where(loss_mask & (segment_ids > 0), per_token, 0.0).astype(jnp.float32)
  sums = jnp.einsum("blk,bl->bk", member, safe)
  counts = member.sum(axis=1)
  present = counts > 0
  per_example = sums / jnp.maximum(counts, 1.0)
  total = jnp.sum(jnp.where(present, per_example, 0.0))
  return total / jnp.maximum(present.sum(), 1).astype(jnp.float32)


# Rectified flow (Liu et al. 2022; SD3, Open-Sora): x_t = (1 - t) x0 + t noise,
# t in [0, 1] continuous (t = 0 data, t = 1 noise); the model predicts the
# constant velocity v = dx_t/dt = noise - x0.


def _broadcast_time(t, x):
  t = jnp.asarray(t, dtype=jnp.float32)
  sched._check_leading(x, t)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def flow_interpolate(x0, noise, t_cont):
  """(x_t, v_target) with x_t = (1 - t) x0 + t noise and v = noise - x0; t [B, L] or [B]."""
  t = _broadcast_time(t_cont, x0)
  return (1.0 - t) * x0 + t * noise, noise - x0


def flow_loss_per_token(out, x0, noise):
  """Squared error of the predicted velocity, averaged over the last (channel) axis."""
  if out.shape != x0.shape:
    raise ValueError(f"Flow output {out.shape} must have the shape of x0 {x0.shape}")
  return jnp.mean(jnp.square(out - (noise - x0)), axis=-1)


def logit_normal_times(rng, shape, mean=0.0, std=1.0):
  """Flow times t = sigmoid(mean + std * n), n ~ N(0, 1) (SD3's logit-normal sampling)."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))


def shift_times(t, shift):
  """Resolution shift t' = shift t / (1 + (shift - 1) t) (SD3, Open-Sora); shift > 1 adds noise."""
  if isinstance(shift, (int, float)) and shift <= 0:
    raise ValueError(f"shift must be positive, got {shift}")
  return shift * t / (1.0 + (shift - 1.0) * t)
