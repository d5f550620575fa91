"""Diffusion backbones on packed batches: build the model, the loss, the sampler.

The loop calls these functions and nothing else. Timesteps are drawn per
example ([B, K]) and gathered to tokens through segment ids, so one row can
hold examples at different noise levels.
"""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.data import packing, pipeline
from diffusion_jax.diffusion import objectives, samplers, schedules
from diffusion_jax.models import dit


def patch_dim(config) -> int:
  pt, ph, pw = config.data.patch
  return pt * ph * pw * config.data.channels


def example_grid(config) -> tuple:
  """(T', H', W') patch grid of one image of the configured size."""
  pt, ph, pw = config.data.patch
  size = config.data.image_size
  return (1 // pt, size // ph, size // pw)


MODEL_FAMILIES = ("dit", "unet")


def _model_family(config) -> str:
  family = config.model.get("family", "dit")
  if family not in MODEL_FAMILIES:
    raise ConfigError(f"unknown model.family {family!r}; known: {MODEL_FAMILIES}")
  return family


def validate(config) -> None:
  family = _model_family(config)
  if family == "unet":
    from diffusion_jax.models import unet  # pylint: disable=g-import-not-at-top
    variants = unet.VARIANTS
  else:
    variants = dit.VARIANTS
  if config.model.variant not in variants:
    raise ConfigError(f"unknown model.variant {config.model.variant!r} for model.family={family!r}; "
                      f"known: {sorted(variants)}")
  pt, ph, pw = config.data.patch
  size = config.data.image_size
  if pt != 1:
    raise ConfigError(f"data.patch={tuple(config.data.patch)}: images are one-frame videos, the temporal patch must be 1")
  if size % ph or size % pw:
    raise ConfigError(f"data.patch={tuple(config.data.patch)} does not divide data.image_size={size}")
  if family == "dit" and dit.VARIANTS[config.model.variant]["patch"] != ph:
    raise ConfigError(
        f"data.patch={tuple(config.data.patch)} disagrees with model.variant={config.model.variant!r} "
        f"(patch {dit.VARIANTS[config.model.variant]['patch']})")
  tokens = int(np.prod(example_grid(config)))
  if config.data.tokens_per_row < tokens:
    raise ConfigError(
        f"data.tokens_per_row={config.data.tokens_per_row} is smaller than one example ({tokens} tokens at "
        f"image_size={size}, patch={tuple(config.data.patch)})")
  if family == "unet":
    # A convolutional net sees one example filling a fixed grid per row.
    if config.data.examples_per_row != 1 or config.data.tokens_per_row != tokens:
      raise ConfigError(
          f"model.family='unet' needs one example filling each row: data.examples_per_row="
          f"{config.data.examples_per_row} must be 1 and data.tokens_per_row={config.data.tokens_per_row} must "
          f"equal the grid's {tokens} tokens (image_size={size}, patch={tuple(config.data.patch)})")
    try:
      unet.check_image_size(config.model.variant, size, size)
    except ValueError as e:
      raise ConfigError(f"model.variant={config.model.variant!r} at data.image_size={size}: {e}") from e
  if config.diffusion.prediction not in ("eps", "v", "x0"):
    raise ConfigError(f"unknown diffusion.prediction {config.diffusion.prediction!r}; use eps, v or x0")


def build_model(config):
  """The backbone of `model.family`: 'dit' (models/dit.py, default) or 'unet' (models/unet.py)."""
  dtype = jnp.dtype(config.train.compute_dtype)
  if _model_family(config) == "unet":
    from diffusion_jax.models import unet  # pylint: disable=g-import-not-at-top
    return unet.build_unet(config.model, patch_dim=patch_dim(config), grid=example_grid(config),
                           patch=tuple(config.data.patch), channels=config.data.channels, dtype=dtype)
  return dit.build_dit(config.model, patch_dim=patch_dim(config), dtype=dtype)


def make_schedule(config) -> schedules.Schedule:
  return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)


def dummy_batch(config, rows: int) -> dict:
  """Zeros with the shapes and dtypes of a packed batch of `rows` rows."""
  length, k = config.data.tokens_per_row, config.data.examples_per_row
  return dict(
      patches=np.zeros((rows, length, patch_dim(config)), np.float32),
      segment_ids=np.ones((rows, length), np.int32),
      positions=np.zeros((rows, length, 3), np.int32),
      cond_mask=np.zeros((rows, length), bool),
      grid=np.zeros((rows, k, 3), np.int32),
      example_ids=np.zeros((rows, k), np.int64),
      labels=np.zeros((rows, k), np.int32),
  )


def init_params(model, config, rng):
  batch = dummy_batch(config, 1)
  t = jnp.zeros(batch["segment_ids"].shape, jnp.float32)
  return model.init({"params": rng}, batch["patches"], t, batch["labels"], batch["segment_ids"],
                    batch["positions"], train=False)["params"]


def per_token(values, segment_ids):
  """Gathers per-example values [B, K, ...] to tokens [B, L, ...] (padding takes example 1's)."""
  index = jnp.maximum(segment_ids - 1, 0)
  index = index.reshape(index.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, index, axis=1)


def loss_fn(params, model, schedule, batch, rng, config, *, train=True):
  """Diffusion loss of one packed batch; each example weighs the same (see reduce_per_example)."""
  t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  x0 = batch["patches"]
  segment_ids = batch["segment_ids"]
  rows, k = batch["labels"].shape
  t_example = jax.random.randint(t_rng, (rows, k), 0, schedule.num_steps)
  # Conditioning tokens stay clean (t = 0) and carry no loss.
  t = jnp.where(batch["cond_mask"], 0, per_token(t_example, segment_ids))
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = schedules.q_sample(schedule, x0, t, noise)
  x_t = jnp.where(batch["cond_mask"][..., None], x0, x_t)
  out = model.apply({"params": params}, x_t, t.astype(jnp.float32), batch["labels"], segment_ids,
                    batch["positions"], train=train, rngs={"dropout": dropout_rng})
  out = out.astype(jnp.float32)
  token_loss = objectives.per_token_loss(schedule, out, x0, x_t, t, noise,
                                         prediction=config.diffusion.prediction,
                                         learn_sigma=config.model.learn_sigma)
  loss_mask = (segment_ids > 0) & ~batch["cond_mask"]
  loss = objectives.reduce_per_example(token_loss, segment_ids, loss_mask, k)
  return loss, {"loss": loss, **timestep_bucket_losses(token_loss, segment_ids, loss_mask, t_example,
                                                        schedule.num_steps)}


NUM_T_BUCKETS = 4


def timestep_bucket_losses(token_loss, segment_ids, loss_mask, t_example, num_steps: int) -> dict:
  """The loss split by noise level: bucket i holds the examples with t in
  [i T / 4, (i + 1) T / 4).

  Returns loss_t{i}, the mean per-example loss over the bucket's examples
  (objectives.reduce_per_example restricted to them), and examples_t{i}, how
  many examples it averaged. An empty bucket reports loss 0 and count 0, never
  NaN, so TensorBoard curves stay finite; weigh by the count to average
  buckets over steps or batches (the eval section of train/loop.py does).
  """
  k = t_example.shape[1]
  bucket_of_token = per_token(t_example * NUM_T_BUCKETS // num_steps, segment_ids)
  ids = jnp.arange(1, k + 1, dtype=segment_ids.dtype)
  out = {}
  for i in range(NUM_T_BUCKETS):
    mask = loss_mask & (bucket_of_token == i)
    out[f"loss_t{i}"] = objectives.reduce_per_example(token_loss, segment_ids, mask, k)
    present = jnp.any((segment_ids[..., None] == ids) & mask[..., None], axis=1)  # [B, K]
    out[f"examples_t{i}"] = jnp.sum(present).astype(jnp.float32)
  return out


make_dataset = pipeline.make_dataset  # packed rows of the configured tfds dataset


def eval_fn(params, model, schedule, batch, index, config) -> dict:
  """Held-out loss of eval batch number `index`, deterministic: train=False
  (no dropout, no label dropout) and timesteps and noise drawn from a key
  fixed by (train.seed, index), so evaluations of the same params at
  different steps see the same noise and compare directly."""
  rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed + 1), index)
  _, aux = loss_fn(params, model, schedule, batch, rng, config, train=False)
  return aux


def summarize_eval(auxes: list[dict]) -> dict:
  """eval/loss, eval/loss_t{i} and eval/examples over the eval set: batches and
  buckets averaged weighted by their example counts; a bucket without any
  example over the whole set is left out."""
  buckets = range(NUM_T_BUCKETS)
  examples = [sum(float(aux[f"examples_t{i}"]) for i in buckets) for aux in auxes]
  total = sum(examples)
  result = {"eval/loss": sum(float(aux["loss"]) * n for aux, n in zip(auxes, examples)) / max(total, 1.0),
            "eval/examples": total}
  for i in buckets:
    count = sum(float(aux[f"examples_t{i}"]) for aux in auxes)
    if count:
      result[f"eval/loss_t{i}"] = sum(float(aux[f"loss_t{i}"] * aux[f"examples_t{i}"]) for aux in auxes) / count
  return result


def sample(model, params, config, labels, rng, *, sampler="ddim", steps=50, eta=0.0, cfg_scale=1.0):
  """Class-conditional images, one per label: returns uint8 [N, H, W, C].

  Each image is one row of exactly its own tokens; the whole sampling loop is
  one compiled program.
  """
  grid = example_grid(config)
  image = np.zeros((grid[0] * config.data.patch[0], config.data.image_size, config.data.image_size,
                    config.data.channels), np.float32)
  _, positions, _ = packing.patchify(image, tuple(config.data.patch))
  n, length = len(labels), positions.shape[0]
  segment_ids = jnp.ones((n, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (n, length, 3))
  labels = jnp.asarray(labels, jnp.int32)[:, None]
  null = jnp.full_like(labels, config.model.num_classes)
  schedule = make_schedule(config)

  def apply_fn(x, t, y):
    rows = x.shape[0]
    seg = jnp.broadcast_to(segment_ids[:1], (rows, length))
    pos = jnp.broadcast_to(positions[:1], (rows, length, 3))
    return model.apply({"params": params}, x, t.astype(jnp.float32), y, seg, pos, train=False).astype(jnp.float32)

  model_fn = samplers.guided_model_fn(apply_fn, labels, null, cfg_scale, config.model.learn_sigma)
  noise_rng, sample_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, (n, length, patch_dim(config)), jnp.float32)
  common = dict(prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma, clip_x0=(-1.0, 1.0))
  if sampler == "ddim":
    x0 = samplers.ddim_sample(schedule, model_fn, noise, sample_rng, num_steps=steps, eta=eta, **common)
  elif sampler == "ddpm":
    x0 = samplers.ddpm_sample(schedule, model_fn, noise, sample_rng, **common)
  else:
    raise ValueError(f"unknown sampler {sampler!r}; use ddim or ddpm")
  videos = jax.vmap(lambda tokens: packing.unpatchify(tokens, grid, tuple(config.data.patch), config.data.channels))(x0)
  images = videos[:, 0]
  return np.asarray(jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
