"""Per-request SDEdit strength in every sampler family, negative prompts and the prompt expander, at
the sampler, objective and sample.py levels (no training; the CLI runs of every mode on trained
smoke models are in test_video_chain.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax import inference
from diffusion_jax import sample as sample_lib
from diffusion_jax.data import imaging, moving_digits
from diffusion_jax.diffusion import kinds, samplers
from diffusion_jax.diffusion import schedules as sched
from diffusion_jax.models import dit
from diffusion_jax.train import dit_task

TEXT_DIM = 8


def _toy_eps_model(x, t):
  """A per-token model (no token sees another), so a packed row is its tokens sampled one by one."""
  return 0.3 * jnp.tanh(x) * jnp.cos(t.astype(jnp.float32)[..., None] * 0.01) + 0.05


def _halves(start_a, start_b, n=6):
  return jnp.asarray(np.array([[start_a] * n + [start_b] * n]), jnp.int32), n


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_per_token_starts_equal_each_start_alone(eta):
  s = sched.make_schedule("linear", 100)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 12, 3)), jnp.float32)
  key = None if eta == 0 else jax.random.PRNGKey(3)
  run = lambda start, n: samplers.ddim_sample(s, _toy_eps_model, x, key, num_steps=n, eta=eta, prediction="eps",  # noqa: E731
                                              learn_sigma=False, start_step=start)
  starts, half = _halves(80, 30)
  mixed = np.asarray(run(starts, 8))
  np.testing.assert_allclose(mixed[:, :half], np.asarray(run(80, 8))[:, :half], atol=1e-5)
  np.testing.assert_allclose(mixed[:, half:], np.asarray(run(30, 8))[:, half:], atol=1e-5)
  # A start below the step count: its tokens take every step from their start once (the others wait).
  starts, half = _halves(99, 4)
  mixed = np.asarray(run(starts, 8))
  np.testing.assert_allclose(mixed[:, :half], np.asarray(run(99, 8))[:, :half], atol=1e-5)
  if eta == 0:  # with noise, the key of each step differs between 8 and 5 steps
    np.testing.assert_allclose(mixed[:, half:], np.asarray(run(4, 5))[:, half:], atol=1e-5)


def test_ddpm_per_token_starts_equal_each_start_alone():
  s = sched.make_schedule("linear", 60)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 12, 3)), jnp.float32)
  run = lambda start: np.asarray(samplers.ddpm_sample(s, _toy_eps_model, x, jax.random.PRNGKey(2), prediction="eps",  # noqa: E731
                                                      learn_sigma=False, start_step=start))
  starts, half = _halves(59, 12)
  mixed = run(starts)
  np.testing.assert_allclose(mixed[:, :half], run(59)[:, :half], atol=1e-5)
  np.testing.assert_allclose(mixed[:, half:], run(12)[:, half:], atol=1e-5)
  np.testing.assert_allclose(run(59), np.asarray(samplers.ddpm_sample(  # no start = the full chain, as before
      s, _toy_eps_model, x, jax.random.PRNGKey(2), prediction="eps", learn_sigma=False)), atol=0)


def _two_examples(n=1000, p=4, strengths=(0.2, 0.7)):
  rng = np.random.default_rng(4)
  given = jnp.asarray(rng.uniform(-1, 1, size=(1, 2 * n, p)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(1, 2 * n, p)), jnp.float32)
  segment_ids = jnp.asarray(np.array([[1] * n + [2] * n]), jnp.int32)
  return given, noise, segment_ids, jnp.asarray([list(strengths)], jnp.float32), n


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim", "ddpm"])
def test_each_example_keeps_its_own_sdedit_strength(sampler):
  """Two examples of one call at strengths 0.2 and 0.7, a model that predicts zero (velocity or eps):
  the output of each has its own strength's closed form (flow: (1 - s) x + s noise; DDIM:
  x + sqrt(1 / abar_k - 1) noise at k = round(s (T - 1)); DDPM: the residual's variance
  (1 - abar_k) / abar_k + sum_{t=1..k} beta-tilde_t / abar_{t-1}), none of them the batch's largest."""
  given, noise, segment_ids, strength, n = _two_examples()
  zero = lambda x, t: jnp.zeros_like(x)  # noqa: E731
  cond = jnp.zeros(segment_ids.shape, bool)
  if sampler in ("euler", "heun"):
    objective = kinds.FlowObjective(0.0, 1.0, shift_base_tokens=0)
  else:
    objective = kinds.DdpmObjective(sched.make_schedule("linear", 1000), "eps", learn_sigma=False)
  out = np.asarray(objective.sample(zero, given, noise, jax.random.PRNGKey(0), segment_ids=segment_ids,
                                    cond_mask=cond, strength=strength, sampler=sampler, steps=10, eta=0.0))
  given, noise = np.asarray(given), np.asarray(noise)
  abar = np.cumprod(1.0 - np.asarray(objective.schedule.betas, np.float64)) if sampler in ("ddim", "ddpm") else None
  for i, s in enumerate(np.asarray(strength)[0]):
    part = slice(i * n, (i + 1) * n)
    if sampler in ("euler", "heun"):
      np.testing.assert_allclose(out[0, part], (1 - s) * given[0, part] + s * noise[0, part], atol=1e-5)
      continue
    k = int(round(s * 999))
    if sampler == "ddim":
      np.testing.assert_allclose(out[0, part], given[0, part] + np.sqrt(1 / abar[k] - 1) * noise[0, part],
                                 rtol=1e-4, atol=1e-4)
    else:
      betas = np.asarray(objective.schedule.betas, np.float64)
      tilde = betas[1:k + 1] * (1 - abar[:k]) / (1 - abar[1:k + 1])
      expected = (1 - abar[k]) / abar[k] + np.sum(tilde / abar[:k])
      assert np.var(out[0, part] - given[0, part]) == pytest.approx(expected, rel=0.1), (s, k)


# --------------------------------------------------------------------------- sample.py on a small DiT


class _FakeEncoder:
  """Text encoder stand-in: a caption's tokens are its characters' codes spread over TEXT_DIM."""

  def encode(self, texts, max_length=32):
    tokens = np.zeros((len(texts), max_length, TEXT_DIM), np.float32)
    mask = np.zeros((len(texts), max_length), bool)
    for i, text in enumerate(texts):
      codes = [ord(ch) / 128.0 for ch in text[:max_length]]
      tokens[i, :len(codes)] = np.asarray(codes)[:, None] * np.linspace(-1, 1, TEXT_DIM)
      mask[i, :len(codes)] = True
    return tokens, mask


def _generator(kind="flow", text=True):
  c = ml_collections.ConfigDict()
  c.data = dict(fixed_size=False, patch=(1, 2, 2), channels=3, tokens_per_row=48, examples_per_row=4,
                text_tokens_per_row=64 if text else 0)
  c.model = dict(variant="smoke", num_classes=0, text_dim=TEXT_DIM if text else 0, learn_sigma=False)
  c.diffusion = dict(kind=kind, shift_base_tokens=16, logit_mean=0.0, logit_std=1.0, cond={}, schedule="linear",
                     num_steps=100, prediction="eps")
  c.sample = dict(frames=3, eta=0.0)
  model = dit.DiT(patch_dim=12, width=32, depth=2, num_heads=2, num_classes=0, text_dim=TEXT_DIM if text else 0,
                  learn_sigma=False, pos_embedding="rope3d", qk_norm=True)
  dummy = dit_task.dummy_batch(c, 1)
  extra = dict(text=dummy["text"], text_segment_ids=dummy["text_segment_ids"]) if text else {}
  params = model.init(jax.random.PRNGKey(0), dummy["patches"], dummy["segment_ids"].astype(np.float32),
                      dummy["labels"], dummy["segment_ids"], dummy["positions"], **extra)["params"]
  leaves, tree = jax.tree_util.tree_flatten(params)  # off the zero init, so the model's output matters
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return inference.Generator(c, model, params, vae=None, text_encoder=_FakeEncoder() if text else None)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("modes") / "clip.npz"
  np.savez(path, frames=np.random.default_rng(5).uniform(0, 255, (3, 8, 8, 3)).astype(np.uint8))
  return str(path)


@pytest.mark.parametrize("kind,sampler", [("flow", "euler"), ("flow", "heun"), ("ddpm", "ddim"), ("ddpm", "ddpm")])
def test_two_sdedit_requests_of_different_strengths_in_one_call(kind, sampler, clip_file):
  """Request A (strength 0.25) comes out the same whether B beside it is at 0.9 or at 0.25, and
  differs from A at strength 1 (once, `ddpm` ignored strength and DDIM took the batch's largest)."""
  gen = _generator(kind)
  edit = lambda s: sample_lib.Request("a 3", (8, 8), 3, mode="sdedit", input=clip_file, strength=s)  # noqa: E731
  run = lambda reqs: sample_lib.sample_requests(gen, reqs, sampler=sampler, steps=4, cfg_scale=2.0,  # noqa: E731
                                                rows_per_call=1)[0]
  beside_high = run([edit(0.25), edit(0.9)])
  beside_low = run([edit(0.25), edit(0.25)])
  full = run([edit(1.0), edit(0.9)])
  np.testing.assert_array_equal(beside_high[0], beside_low[0])
  source = sample_lib.read_media(clip_file, 3).astype(int)
  distance = lambda v: np.abs(v.astype(int) - source).mean()  # noqa: E731
  assert distance(beside_high[0]) < distance(full[0]), (distance(beside_high[0]), distance(full[0]))
  assert np.abs(beside_high[1].astype(int) - beside_low[1]).max() > 0  # B's own strength counts


def test_negative_prompts():
  """The unconditional branch reads the negative prompt: a negative prompt equal to the prompt
  cancels guidance (the same video as cfg 1); another one changes the video; a request without
  one beside it is unaffected; a model without text refuses it."""
  gen = _generator("flow")
  request = lambda neg="", prompt="a red 3 moving left": sample_lib.Request(prompt, (8, 8), 3, negative=neg)  # noqa: E731
  run = lambda reqs, cfg: sample_lib.sample_requests(gen, reqs, sampler="euler", steps=4, cfg_scale=cfg,  # noqa: E731
                                                     rows_per_call=1)[0]
  [plain] = run([request()], 1.0)
  cancelled, other = run([request(neg="a red 3 moving left"), request(prompt="a 7")], 3.0)
  np.testing.assert_allclose(cancelled.astype(int), plain.astype(int), atol=1)
  guided, other_alone = run([request(), request(prompt="a 7")], 3.0)
  negated, other_beside = run([request(neg="a blue 9"), request(prompt="a 7")], 3.0)
  assert np.abs(negated.astype(int) - guided).max() > 2
  np.testing.assert_allclose(other_beside.astype(int), other_alone.astype(int), atol=1)
  with pytest.raises(ValueError, match="--cfg-scale=1"):
    run([request(neg="x")], 1.0)
  with pytest.raises(ValueError, match="no text conditioning"):
    sample_lib.sample_requests(_generator("flow", text=False), [request(neg="x")], sampler="euler", steps=2,
                               cfg_scale=2.0, rows_per_call=1)


# --------------------------------------------------------------------------- the prompt expander


def test_expand_caption_fills_defaults_and_keeps_what_is_said():
  expand = moving_digits.expand_caption
  assert expand("a 3") == "a white 3 moving steadily to the right on a black background"
  assert expand("red 7 falling fast on navy") == "a red 7 falling quickly on a navy background"
  assert expand("Seven, still, dark grey background") == "a white 7 standing still on a dark gray background"
  assert expand("an orange 1 and a cyan 9 rising slowly and bouncing") == (
      "an orange 1 moving steadily to the right while a cyan 9 rises slowly and bounces on a black background")
  assert expand("a blue 5 going up left", frames=1) == "a blue 5 on a black background"  # an image: no motion
  assert expand("one green 4 moving down and to the left on dark green") == (
      "a green 4 moving steadily down and to the left on a dark green background")  # "one" is no digit here
  parsed = moving_digits.caption_attributes(expand("a magenta 2 moving quickly up-right"))
  assert parsed == dict(digits=[2], colours=["magenta"], background="black", directions=["up-right"],
                        speeds=["quickly"], bounced=[False])
  with pytest.raises(ValueError, match="names no digit"):
    expand("a cat on a mat")


def test_expand_caption_leaves_generator_captions_as_they_are():
  images, labels = imaging.digit_images()
  for i in range(150):
    example = moving_digits.render_moving_digits(images, labels, np.random.default_rng([9, 2, i]), min_side=24,
                                                 max_side=48, max_digits=3, durations=(1, 5, 9))
    assert moving_digits.expand_caption(example["caption"], frames=len(example["video"])) == example["caption"]
