"""Tests of the diffusion core: schedules, objectives and samplers, at tiny sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import objectives as obj
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules as sched

B, L, P = 2, 6, 3


def _np64_schedule(kind, steps):
  betas = sched.beta_schedule(kind, steps)
  return betas, np.cumprod(1.0 - betas)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", sched.SCHEDULE_KINDS)
@pytest.mark.parametrize("steps", [100, 1000])
def test_beta_schedule_shape_range_monotone(kind, steps):
  betas, abar = _np64_schedule(kind, steps)
  assert betas.shape == (steps,) and betas.dtype == np.float64
  assert np.all(betas > 0) and np.all(betas < 1)
  assert np.all(np.diff(betas) >= 0)
  assert np.all(np.diff(abar) < 0)
  if kind == "linear":
    np.testing.assert_allclose(betas[[0, -1]], np.array([1e-4, 0.02]) * 1000 / steps, rtol=1e-12)
  if kind == "quadratic":
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)
    assert np.all(np.diff(betas) > 0)
  if kind == "cosine":
    assert betas.max() <= 0.999
    assert betas[-1] == 0.999  # alpha_bar(T) = cos(pi / 2)^2 = 0, so the last beta is clipped
    s = 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    t = np.arange(steps - 5)  # before clipping starts, abar_t = f((t + 1) / T) / f(0)
    np.testing.assert_allclose(abar[t], f((t + 1) / steps) / f(0), rtol=1e-9)


def test_schedule_bad_inputs():
  with pytest.raises(ValueError, match="linear, quadratic, cosine"):
    sched.beta_schedule("sigmoid", 10)
  with pytest.raises(ValueError, match="outside"):
    sched.beta_schedule("linear", 20)  # 0.02 * 1000 / 20 = 1
  with pytest.raises(ValueError, match="num_steps"):
    sched.make_schedule("cosine", 1)


def test_schedule_fields_float32_and_static_steps():
  s = sched.make_schedule("cosine", 50)
  assert s.num_steps == 50
  leaves = jax.tree_util.tree_leaves(s)
  assert len(leaves) == 11 and all(x.dtype == jnp.float32 and x.shape == (50,) for x in leaves)
  out = jax.jit(lambda s: s.betas.sum() + s.num_steps)(s)  # num_steps stays a Python int
  np.testing.assert_allclose(out, np.asarray(s.betas).sum() + 50, rtol=1e-6)


# ------------------------------------------------------- forward process


@pytest.mark.parametrize("kind", sched.SCHEDULE_KINDS)
def test_q_sample_matches_stepwise_forward_process(kind):
  steps = 50
  s = sched.make_schedule(kind, steps)
  betas = sched.beta_schedule(kind, steps)
  x0 = np.random.default_rng(0).normal(size=(B, L, P))
  t = np.random.default_rng(1).integers(0, steps, size=(B, L)).astype(np.int32)
  # Closed-form recursion of x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps on the
  # mean and variance, t + 1 steps from x0 (float64).
  mean, var = np.broadcast_to(x0, (steps + 1,) + x0.shape).copy(), np.zeros(steps + 1)
  for i in range(steps):
    mean[i + 1] = np.sqrt(1 - betas[i]) * mean[i]
    var[i + 1] = (1 - betas[i]) * var[i] + betas[i]
  want_mean = np.take_along_axis(mean[1:], t[None, ..., None].repeat(P, -1), 0)[0]
  want_var = var[1:][t][..., None]
  q_mean, q_var, q_logvar = sched.q_mean_variance(s, jnp.asarray(x0, jnp.float32), t)
  np.testing.assert_allclose(q_mean, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.broadcast_to(q_var, x0.shape), np.broadcast_to(want_var, x0.shape),
                             rtol=1e-5)
  np.testing.assert_allclose(np.exp(q_logvar), np.asarray(q_var), rtol=1e-5)
  # q_sample is affine in the noise: its value at noise 0 is the mean, its slope the std.
  x0j = jnp.asarray(x0, jnp.float32)
  at0 = sched.q_sample(s, x0j, t, jnp.zeros_like(x0j))
  at1 = sched.q_sample(s, x0j, t, jnp.ones_like(x0j))
  np.testing.assert_allclose(at0, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.square(at1 - at0), np.broadcast_to(want_var, x0.shape), rtol=1e-5)


def test_q_sample_monte_carlo_matches_chain():
  steps, n = 30, 20000
  s = sched.make_schedule("linear", 100)
  betas = sched.beta_schedule("linear", 100)
  rng = np.random.default_rng(0)
  x = np.full(n, 0.7)
  for i in range(steps):
    x = np.sqrt(1 - betas[i]) * x + np.sqrt(betas[i]) * rng.normal(size=n)
  t = jnp.full((n,), steps - 1, jnp.int32)
  xq = sched.q_sample(s, jnp.full((n,), 0.7), t, jax.random.normal(jax.random.PRNGKey(0), (n,)))
  se = 4 * np.sqrt(x.var() / n)
  assert abs(x.mean() - float(xq.mean())) < 2 * se
  assert abs(x.var() - float(xq.var())) < 0.05 * x.var()


def test_posterior_matches_bayes():
  steps = 40
  s = sched.make_schedule("cosine", steps)
  betas, abar = _np64_schedule("cosine", steps)
  rng = np.random.default_rng(0)
  x0, x_t = rng.normal(size=(B, L, P)), rng.normal(size=(B, L, P))
  t = rng.integers(1, steps, size=(B, L)).astype(np.int32)
  t[0, 0] = 0
  mean, var, logvar = sched.q_posterior(s, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), t)
  # Prior x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}); likelihood x_t ~ N(sqrt(alpha_t) x_{t-1}, beta_t).
  tt = t[..., None]
  prior_var = 1 - abar[np.maximum(tt - 1, 0)]
  prec = 1 / prior_var + (1 - betas[tt]) / betas[tt]
  want_var = 1 / prec
  want_mean = want_var * (np.sqrt(abar[np.maximum(tt - 1, 0)]) * x0 / prior_var
                          + np.sqrt(1 - betas[tt]) * x_t / betas[tt])
  ok = t >= 1
  np.testing.assert_allclose(np.asarray(mean)[ok], want_mean[ok], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.broadcast_to(var, x0.shape)[ok], np.broadcast_to(want_var, x0.shape)[ok],
                             rtol=1e-4)
  # t = 0: x_{-1} is x0 itself; the log variance is clipped to the value at t = 1.
  np.testing.assert_allclose(mean[0, 0], x0[0, 0], rtol=1e-5)
  assert float(var[0, 0, 0]) == 0.0
  np.testing.assert_allclose(logvar[0, 0, 0], np.log(s.posterior_variance[1]), rtol=1e-6)


def test_conversions_round_trip_packed_and_images():
  s = sched.make_schedule("linear", 100)
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  for shape, tshape in [((B, L, P), (B, L)), ((B, 4, 4, 3), (B,))]:
    x0 = jax.random.normal(k[0], shape)
    eps = jax.random.normal(k[1], shape)
    t = jax.random.randint(k[2], tshape, 0, 100)
    x_t = sched.q_sample(s, x0, t, eps)
    v = sched.v_target(s, x0, eps, t)
    for got, want in [(sched.predict_x0_from_eps(s, x_t, t, eps), x0),
                      (sched.predict_eps_from_x0(s, x_t, t, x0), eps),
                      (sched.predict_x0_from_v(s, x_t, t, v), x0),
                      (sched.predict_eps_from_v(s, x_t, t, v), eps)]:
      np.testing.assert_allclose(got, want, atol=2e-3)
    for pred, out in [("eps", eps), ("v", v), ("x0", x0)]:
      got_x0, got_eps = obj.model_output_to_x0_eps(s, out, x_t, t, pred)
      np.testing.assert_allclose(got_x0, x0, atol=2e-3)
      np.testing.assert_allclose(got_eps, eps, atol=2e-3)


def test_extract_and_shape_errors():
  s = sched.make_schedule("linear", 100)
  t = jnp.array([[0, 5, 99]])
  got = sched._extract(s.betas, t, 3)
  assert got.shape == (1, 3, 1)
  np.testing.assert_allclose(got[0, :, 0], np.asarray(s.betas)[[0, 5, 99]])
  with pytest.raises(ValueError, match="leading axes"):
    sched.q_sample(s, jnp.zeros((2, 5, 3)), jnp.zeros((2, 6), jnp.int32), jnp.zeros((2, 5, 3)))
  with pytest.raises(ValueError, match="integers"):
    sched.q_sample(s, jnp.zeros((2, 3)), jnp.zeros((2,)), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="prediction"):
    obj.model_output_to_x0_eps(s, jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), "score")


# ------------------------------------------------------------ objectives


def test_p_mean_variance_learned_range_and_fixed():
  s = sched.make_schedule("linear", 100)
  x_t = jax.random.normal(jax.random.PRNGKey(0), (B, L, P))
  t = jnp.arange(B * L).reshape(B, L) * 9
  pred = jax.random.normal(jax.random.PRNGKey(1), (B, L, P))
  fixed = obj.p_mean_variance(s, pred, x_t, t, prediction="eps", learn_sigma=False)
  np.testing.assert_allclose(fixed["variance"], np.broadcast_to(np.asarray(s.posterior_variance)[t][..., None],
                                                                (B, L, P)))
  for value, want in [(-1.0, s.posterior_log_variance_clipped), (1.0, jnp.log(s.betas))]:
    out = jnp.concatenate([pred, jnp.full_like(pred, value)], -1)
    p = obj.p_mean_variance(s, out, x_t, t, prediction="eps", learn_sigma=True)
    np.testing.assert_allclose(p["log_variance"], np.broadcast_to(np.asarray(want)[t][..., None], (B, L, P)),
                               rtol=1e-5)
    np.testing.assert_allclose(p["mean"], fixed["mean"])
  clipped = obj.p_mean_variance(s, pred * 50, x_t, t, prediction="x0", learn_sigma=False, clip_x0=(-1, 1))
  assert float(jnp.abs(clipped["pred_x0"]).max()) <= 1.0
  with pytest.raises(ValueError, match="channels"):
    obj.p_mean_variance(s, pred, x_t, t, prediction="eps", learn_sigma=True)


def test_normal_kl_and_discretized_likelihood():
  m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(2.0)
  want = np.log(np.sqrt(2.0) / np.sqrt(0.5)) + (0.5 + 0.5 ** 2) / (2 * 2.0) - 0.5
  np.testing.assert_allclose(obj.normal_kl(m1, lv1, m2, lv2), want, rtol=1e-6)
  assert float(obj.normal_kl(m1, lv1, m1, lv1)) == 0.0
  # The 256 bins partition the real line: their probabilities sum to one.
  bins = jnp.asarray(-1 + 2 * np.arange(256) / 255, jnp.float32)
  for mean, log_scale in [(0.1, np.log(0.3)), (0.95, np.log(0.02)), (-2.0, np.log(1.5))]:
    logp = obj.discretized_gaussian_log_likelihood(bins, mean, log_scale)
    assert np.all(np.isfinite(logp))
    np.testing.assert_allclose(jnp.exp(logp).sum(), 1.0, rtol=2e-4)


def _loss_inputs(prediction, seed=0):
  s = sched.make_schedule("cosine", 50)
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x0 = jnp.clip(jax.random.normal(k[0], (B, L, P)) * 0.5, -1, 1)
  noise = jax.random.normal(k[1], (B, L, P))
  t = jax.random.randint(k[2], (B, L), 0, 50).at[0, 0].set(0)
  x_t = sched.q_sample(s, x0, t, noise)
  out = jax.random.normal(k[3], (B, L, 2 * P)) * 0.5
  return s, out, x0, x_t, t, noise


@pytest.mark.parametrize("prediction", obj.PREDICTIONS)
def test_per_token_loss_mse_and_stopped_vb(prediction):
  s, out, x0, x_t, t, noise = _loss_inputs(prediction)

  @jax.jit
  def losses_and_grads(out):
    fn = lambda o, sigma: obj.per_token_loss(s, o, x0, x_t, t, noise, prediction=prediction, learn_sigma=sigma)
    return (fn(out, True), fn(out[..., :P], False), jax.grad(lambda o: fn(o, True).sum())(out),
            jax.grad(lambda o: fn(o, False).sum())(out[..., :P]))

  loss, mse, full, mse_only = losses_and_grads(out)
  assert loss.shape == (B, L) and np.all(np.isfinite(loss))
  target = {"eps": noise, "v": sched.v_target(s, x0, noise, t), "x0": x0}[prediction]
  np.testing.assert_allclose(mse, jnp.mean((target - out[..., :P]) ** 2, -1), rtol=1e-6)
  assert np.all(loss > mse)  # the vb term is a KL / an NLL in bits, positive here
  np.testing.assert_allclose(full[..., :P], mse_only, rtol=1e-6, atol=1e-7)  # vb: no gradient to the mean
  assert float(jnp.abs(full[..., P:]).min()) > 0  # ...but it trains the variance channels, t = 0 included


def test_per_token_loss_zero_for_exact_model():
  s, _, x0, x_t, t, noise = _loss_inputs("x0")
  t = jnp.maximum(t, 1)  # t > 0: the KL term, zero when mean and variance are the posterior's
  x_t = sched.q_sample(s, x0, t, noise)
  out = jnp.concatenate([x0, -jnp.ones_like(x0)], -1)  # -1 selects the posterior variance
  loss = obj.per_token_loss(s, out, x0, x_t, t, noise, prediction="x0", learn_sigma=True)
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)
  # Generic images x [B, H, W, C] with t [B]: one loss per image, the mean over H, W, C (DiT's mean_flat).
  img0, img_noise = x0.reshape(B, 2, 3, P), noise.reshape(B, 2, 3, P)
  t_img = jnp.array([0, 30])
  img_t = sched.q_sample(s, img0, t_img, img_noise)
  out_img = jnp.concatenate([img0 + 0.1, jnp.zeros_like(img0)], -1)
  img_loss = obj.per_token_loss(s, out_img, img0, img_t, t_img, img_noise, prediction="x0", learn_sigma=True)
  assert img_loss.shape == (B,) and np.all(np.isfinite(img_loss))
  mse = obj.per_token_loss(s, out_img[..., :P], img0, img_t, t_img, img_noise, prediction="x0", learn_sigma=False)
  np.testing.assert_allclose(mse, 0.01, rtol=1e-4)


def test_reduce_per_example_weights_examples_equally():
  seg = np.zeros((3, 12), np.int32)
  seg[0, :3], seg[0, 3:10] = 1, 2  # row 0: a 3-token and a 7-token example, 2 padding tokens
  seg[1, :] = 1  # row 1: one 12-token example, 4 tokens masked out (conditioning frames)
  per_token = np.full((3, 12), np.nan, np.float32)  # padding may hold anything, even NaN
  per_token[0, :3], per_token[0, 3:10] = 1.0, 3.0
  per_token[1, :4], per_token[1, 4:] = 100.0, 5.0
  mask = np.ones((3, 12), bool)
  mask[1, :4] = False
  got = obj.reduce_per_example(jnp.asarray(per_token), jnp.asarray(seg), jnp.asarray(mask), 3)
  np.testing.assert_allclose(got, (1.0 + 3.0 + 5.0) / 3, rtol=1e-6)  # not token-weighted (= 3.6)
  grad = jax.grad(obj.reduce_per_example)(jnp.asarray(per_token), jnp.asarray(seg), jnp.asarray(mask), 3)
  assert np.all(np.isfinite(grad)) and float(grad[2].sum()) == 0.0
  np.testing.assert_allclose(grad[0, :3].sum(), 1 / 3, rtol=1e-6)  # each example's tokens weigh 1/3 in all
  np.testing.assert_allclose(grad[0, 3:10].sum(), 1 / 3, rtol=1e-6)
  empty = obj.reduce_per_example(jnp.ones((2, 4)), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool), 2)
  assert float(empty) == 0.0
  with pytest.raises(ValueError, match="num_examples"):
    obj.reduce_per_example(jnp.ones((2, 4)), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool), 0)


def test_rectified_flow_helpers():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  x0, noise = jax.random.normal(k[0], (B, L, P)), jax.random.normal(k[1], (B, L, P))
  t = jax.random.uniform(k[2], (B, L))
  x_t, v = obj.flow_interpolate(x0, noise, t)
  np.testing.assert_allclose(x_t, x0 + t[..., None] * v, atol=1e-6)
  np.testing.assert_allclose(obj.flow_interpolate(x0, noise, jnp.ones((B, L)))[0], noise)
  np.testing.assert_allclose(obj.flow_loss_per_token(v, x0, noise), 0.0)
  assert obj.flow_loss_per_token(v + 1.0, x0, noise).shape == (B, L)
  times = obj.logit_normal_times(jax.random.PRNGKey(1), (4000,))
  assert float(times.min()) > 0 and float(times.max()) < 1
  assert abs(float(jnp.median(times)) - 0.5) < 0.05
  grid = jnp.linspace(0, 1, 11)
  np.testing.assert_allclose(obj.shift_times(grid, 1.0), grid, atol=1e-7)
  shifted = obj.shift_times(grid, 3.0)
  np.testing.assert_allclose(shifted[np.array([0, -1])], [0.0, 1.0], atol=1e-7)
  np.testing.assert_allclose(shifted[5], 0.75, rtol=1e-6)  # 3 * 0.5 / (1 + 2 * 0.5)
  with pytest.raises(ValueError, match="shift"):
    obj.shift_times(grid, 0.0)


# -------------------------------------------------------------- samplers


def _oracle(s, x_star, prediction, learn_sigma=False, keep=None):
  """Exact model output for data concentrated at x_star; NaN if kept tokens are not fed clean at t=0."""

  def model_fn(x_t, t):
    a = sched._extract(s.sqrt_alphas_cumprod, t, x_t.ndim)
    b = sched._extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    eps = (x_t - a * x_star) / b
    out = {"eps": eps, "x0": jnp.broadcast_to(x_star, x_t.shape), "v": a * eps - b * x_star}[prediction]
    if keep is not None:
      mask, clean = keep
      fed_clean = jnp.all(jnp.where(mask[..., None], (x_t == clean) & (t[..., None] == 0), True))
      out = out + jnp.where(fed_clean, 0.0, jnp.nan)
    if learn_sigma:
      out = jnp.concatenate([out, jnp.zeros_like(out)], -1)
    return out

  return model_fn


def test_ddim_timesteps_trailing():
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 50), np.arange(999, 0, -20))
  np.testing.assert_array_equal(samplers.ddim_timesteps(10, 10), np.arange(9, -1, -1))
  np.testing.assert_array_equal(samplers.ddim_timesteps(100, 4, start_step=39), [39, 29, 19, 9])
  for T, n, start in [(7, 3, None), (1000, 37, 600), (100, 99, None)]:
    ts = samplers.ddim_timesteps(T, n, start)
    assert len(ts) == n and ts[0] == (T - 1 if start is None else start) and ts[-1] >= 0
    assert np.all(np.diff(ts) < 0)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.ddim_timesteps(100, 41, start_step=39)
  with pytest.raises(ValueError, match="start_step"):
    samplers.ddim_timesteps(100, 4, start_step=100)


def test_ddim_eta_one_is_ddpm_posterior():
  s = sched.make_schedule("linear", 100)
  t = jnp.arange(1, 100)
  sqrt_abar_prev, direction, sigma = samplers.ddim_coefficients(s, t, t - 1, 1.0)
  np.testing.assert_allclose(np.square(sigma), s.posterior_variance[1:], rtol=1e-5)
  # The DDIM mean sqrt(abar_prev) x0 + direction eps with eps implied by (x_t, x0) is the posterior mean.
  x0, x_t = 0.3, -1.1
  eps = (x_t - s.sqrt_alphas_cumprod[1:] * x0) / s.sqrt_one_minus_alphas_cumprod[1:]
  want = s.posterior_mean_coef1[1:] * x0 + s.posterior_mean_coef2[1:] * x_t
  np.testing.assert_allclose(sqrt_abar_prev * x0 + direction * eps, want, rtol=1e-4, atol=1e-6)
  # Last step to x0 is noiseless; eta = 0 is noiseless everywhere.
  assert float(samplers.ddim_coefficients(s, 5, -1, 1.0)[2]) == 0.0
  assert float(samplers.ddim_coefficients(s, 50, 30, 0.0)[2]) == 0.0


def test_ddim_eta_one_all_steps_equals_ddpm_sampler():
  s = sched.make_schedule("cosine", 20)
  model_fn = lambda x, t: 0.5 * x + 0.01 * t[..., None]  # any model: both must take identical steps
  noise = jax.random.normal(jax.random.PRNGKey(0), (B, L, P))
  rng = jax.random.PRNGKey(1)
  ddpm = samplers.ddpm_sample(s, model_fn, noise, rng, prediction="eps", learn_sigma=False)
  ddim = samplers.ddim_sample(s, model_fn, noise, rng, num_steps=20, eta=1.0, prediction="eps",
                              learn_sigma=False)
  np.testing.assert_allclose(ddim, ddpm, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("prediction,learn_sigma", [("eps", True), ("v", False), ("x0", False)])
def test_samplers_recover_point_mass_and_hold_kept_tokens(prediction, learn_sigma):
  s = sched.make_schedule("linear", 100)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x_star = jax.random.uniform(k[0], (B, L, P), minval=-1, maxval=1)
  keep_mask = jnp.zeros((B, L), bool).at[:, :2].set(True)
  keep_x0 = jax.random.normal(k[1], (B, L, P)) * 3
  model_fn = _oracle(s, x_star, prediction, learn_sigma, keep=(keep_mask, keep_x0))
  noise = jax.random.normal(k[2], (B, L, P))
  kw = dict(prediction=prediction, learn_sigma=learn_sigma, keep_mask=keep_mask, keep_x0=keep_x0)
  ddpm = jax.jit(lambda n, r: samplers.ddpm_sample(s, model_fn, n, r, **kw))(noise, k[3])
  outs = [ddpm]
  for eta in (0.0, 1.0):
    outs.append(jax.jit(lambda n, r: samplers.ddim_sample(s, model_fn, n, r, num_steps=10, eta=eta, **kw))(
        noise, k[3]))
  for out in outs:
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, :2], keep_x0[:, :2])
    np.testing.assert_allclose(out[:, 2:], x_star[:, 2:], atol=2e-3)


def test_ddim_sdedit_start_step_and_clip():
  s = sched.make_schedule("cosine", 100)
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  x_star = jax.random.uniform(k[0], (B, L, P), minval=-0.9, maxval=0.9)
  x_edit = jax.random.normal(k[1], (B, L, P))
  x_k = sched.q_sample(s, x_edit, jnp.full((B, L), 60), jax.random.normal(k[2], (B, L, P)))
  out = samplers.ddim_sample(s, _oracle(s, x_star, "eps"), x_k, None, num_steps=6, start_step=60,
                             prediction="eps", learn_sigma=False, clip_x0=(-1.0, 1.0))
  np.testing.assert_allclose(out, x_star, atol=2e-3)
  with pytest.raises(ValueError, match="rng"):
    samplers.ddim_sample(s, _oracle(s, x_star, "eps"), x_k, None, num_steps=6, eta=1.0,
                         prediction="eps", learn_sigma=False)


def _gaussian_eps_model(s, mu, sd):
  """The exact eps of data x0 ~ N(mu, sd^2): E[eps | x_t] = b (x_t - a mu) / (a^2 sd^2 + b^2)."""

  def model_fn(x_t, t):
    a = sched._extract(s.sqrt_alphas_cumprod, t, x_t.ndim)
    b = sched._extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return b * (x_t - a * mu) / (a * a * sd * sd + b * b)

  return model_fn


def test_ddpm_gaussian_data_moments_match_float64_recursion():
  """Every DDPM step is affine in x plus Gaussian noise, so the exact output moments follow a recursion."""
  steps, mu, sd = 100, 0.4, 0.3
  s = sched.make_schedule("linear", steps)
  betas, abar = _np64_schedule("linear", steps)
  abar_prev = np.append(1.0, abar[:-1])
  c1, c2 = betas * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
  m, v = 0.0, 1.0
  for t in range(steps - 1, -1, -1):
    a, d = np.sqrt(abar[t]), abar[t] * sd ** 2 + 1 - abar[t]
    gain = c1[t] * a * sd ** 2 / d + c2[t]  # d mean / d x_t
    m = c1[t] * (mu - a * a * sd ** 2 * mu / d) + gain * m
    v = gain ** 2 * v + (betas[t] * (1 - abar_prev[t]) / (1 - abar[t]) if t > 0 else 0.0)
  noise = jax.random.normal(jax.random.PRNGKey(0), (8, 64, 4))
  out = np.asarray(samplers.ddpm_sample(s, _gaussian_eps_model(s, mu, sd), noise, jax.random.PRNGKey(1),
                                        prediction="eps", learn_sigma=False), np.float64)
  n = out.size
  assert abs(out.mean() - m) < 4 * np.sqrt(v / n)
  assert abs(out.std() - np.sqrt(v)) < 4 * np.sqrt(v / (2 * n))
  # Fixed-small variance with T = 100 shrinks the spread by ~10%; the mean is unbiased.
  assert abs(np.sqrt(v) - sd) < 0.12 * sd and abs(m - mu) < 0.01


def test_ddim_gaussian_data_is_the_float64_affine_map():
  """Deterministic DDIM on N(mu, sd^2) data maps x_T to mu + K (x_T - a_T mu), K a product of step gains."""
  steps, mu, sd, n = 100, 0.4, 0.3, 25
  s = sched.make_schedule("linear", steps)
  _, abar = _np64_schedule("linear", steps)
  ts = samplers.ddim_timesteps(steps, n)
  gain = 1.0
  for t, t_prev in zip(ts, list(ts[1:]) + [-1]):
    a, b = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
    a2, b2 = (np.sqrt(abar[t_prev]), np.sqrt(1 - abar[t_prev])) if t_prev >= 0 else (1.0, 0.0)
    gain *= (a2 * a * sd ** 2 + b2 * b) / (a * a * sd ** 2 + b * b)
  noise = jax.random.normal(jax.random.PRNGKey(0), (B, L, P))
  out = samplers.ddim_sample(s, _gaussian_eps_model(s, mu, sd), noise, None, num_steps=n,
                             prediction="eps", learn_sigma=False)
  np.testing.assert_allclose(out, mu + gain * (np.asarray(noise) - np.sqrt(abar[-1]) * mu), rtol=1e-4, atol=1e-5)


def test_guided_model_fn():
  calls = []

  def apply_fn(x, t, labels):
    calls.append(x.shape[0])
    scale = 1.0 + labels.sum(-1).astype(jnp.float32)[:, None, None]
    return jnp.concatenate([x * scale + t[..., None], x * 0 + scale], -1)  # 2P channels

  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, P))
  t = jnp.full((B, L), 7)
  labels, null = jnp.array([[2], [5]]), jnp.array([[10], [10]])
  cond, uncond = apply_fn(x, t, labels), apply_fn(x, t, null)
  calls.clear()
  for scale, want in [(1.0, cond[..., :P]), (0.0, uncond[..., :P]),
                      (3.0, uncond[..., :P] + 3.0 * (cond[..., :P] - uncond[..., :P]))]:
    out = samplers.guided_model_fn(apply_fn, labels, null, scale, learn_sigma=True)(x, t)
    np.testing.assert_allclose(out[..., :P], want, rtol=1e-6)
    np.testing.assert_allclose(out[..., P:], cond[..., P:])  # conditional variance channels
  assert calls == [2 * B] * 3  # one batched call of conditional + unconditional each time
  plain = samplers.guided_model_fn(lambda x, t, y: apply_fn(x, t, y)[..., :P], labels, 10, 1.0, False)(x, t)
  np.testing.assert_allclose(plain, cond[..., :P], rtol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_recovers_point_mass(shift):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  x_star = jax.random.normal(k[0], (B, L, P))
  keep_mask = jnp.zeros((B, L), bool).at[1, 3:].set(True)
  keep_x0 = jax.random.normal(k[1], (B, L, P))

  def velocity(x_t, t):  # straight paths to x_star: v = (x_t - x_star) / t
    return (x_t - x_star) / jnp.maximum(t, 1e-6)[..., None]

  noise = jax.random.normal(k[2], (B, L, P))
  times = samplers.flow_time_grid(4, jnp.ones((B, L)), shift)  # the Euler sampler of flow_sample
  out = jax.jit(lambda n: samplers.flow_sample(velocity, n, times, method="euler",
                                               keep_mask=keep_mask, keep_x0=keep_x0))(noise)
  keep = np.asarray(keep_mask)
  np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(keep_x0)[keep])
  np.testing.assert_allclose(np.asarray(out)[~keep], np.asarray(x_star)[~keep], atol=1e-5)
  with pytest.raises(ValueError, match="together"):
    samplers.flow_sample(velocity, noise, samplers.flow_time_grid(2, jnp.ones((B, L))), keep_mask=keep_mask)
