"""Diffusion backbones on packed batches: build the model, the loss, the sampler.

The loop calls these functions and nothing else. Timesteps are drawn per
example ([B, K]) and gathered to tokens through segment ids, so one row can
hold examples at different noise levels.

The objective (config.diffusion.kind: ddpm or rectified flow) is an object of
diffusion/kinds.py: it draws the training times, corrupts, scores the model's
output and samples; this module holds no branch on the kind.

Loss weighting, both kinds: every example of the batch counts once, whatever
its size (the mean over its loss tokens, then the mean over examples), so long
clips do not drown short ones; padding and conditioning tokens carry no loss.

Conditioning by masking (Sora, Open-Sora): with the probabilities of
config.diffusion.cond, a video example's first frame (i2v), first n frames
(extend), first and last frames (interpolate) or random frames become clean
context at t = 0 without loss; the same masks drive the samplers' modes.
"""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import metrics
from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.diffusion import kinds, objectives, samplers
from diffusion_jax.models import dit, layers, unet


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
  family = config.model.family
  if family not in MODEL_FAMILIES:
    raise ConfigError(f"unknown model.family {family!r}; known: {MODEL_FAMILIES}")
  return family


COND_MODES = ("i2v", "extend", "interpolate", "random")


def uses_text(config) -> bool:
  return int(config.model.text_dim) > 0


def samples_from_prompts(config) -> bool:
  """Text-conditional or latent models sample from prompts (sample.py); class-conditional pixel
  image models sample class grids."""
  # config.latent exists only for a model trained on an encoded dataset (config_defaults)
  return uses_text(config) or bool(config.get("latent", {}).get("vae", "")) or not config.data.fixed_size


def validate(config) -> None:
  kinds.validate(config)
  unknown = set(config.diffusion.cond) - set(COND_MODES)
  if unknown:
    raise ConfigError(f"unknown diffusion.cond modes {sorted(unknown)}; known: {COND_MODES}")
  if sum(config.diffusion.cond.values()) > 1:
    raise ConfigError(f"diffusion.cond probabilities {dict(config.diffusion.cond)} sum to more than 1")
  if uses_text(config) and int(config.data.text_tokens_per_row) < 1:
    raise ConfigError(f"model.text_dim={config.model.text_dim} needs data.text_tokens_per_row >= 1 "
                      "(the packed caption budget of a row)")
  backend = config.model.attention_backend
  if backend not in layers.ATTENTION_BACKENDS:
    raise ConfigError(f"unknown model.attention_backend {backend!r}; known: {layers.ATTENTION_BACKENDS}")
  if config.data.fixed_size and int(config.data.image_size) < 1:
    raise ConfigError(f"data.fixed_size needs data.image_size >= 1, got {config.data.image_size}")
  if not config.data.fixed_size:  # native-size video data: the pipeline fits each example to L
    if config.model.family == "unet":
      raise ConfigError("model.family='unet' needs data.fixed_size=True (a convolutional net takes one grid)")
    if config.model.variant not in dit.VARIANTS:
      raise ConfigError(f"unknown model.variant {config.model.variant!r}; known: {sorted(dit.VARIANTS)}")
    if dit.VARIANTS[config.model.variant]["patch"] != config.data.patch[1]:
      raise ConfigError(f"data.patch={tuple(config.data.patch)} disagrees with model.variant="
                        f"{config.model.variant!r} (patch {dit.VARIANTS[config.model.variant]['patch']})")
    return
  family = _model_family(config)
  if family == "unet":
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


def build_model(config):
  """The backbone of `model.family`: 'dit' (models/dit.py, default) or 'unet' (models/unet.py)."""
  dtype = jnp.dtype(config.train.compute_dtype)
  if _model_family(config) == "unet":
    return unet.build_unet(config.model, patch_dim=patch_dim(config), grid=example_grid(config),
                           patch=tuple(config.data.patch), channels=config.data.channels, dtype=dtype)
  return dit.build_dit(config.model, patch_dim=patch_dim(config), dtype=dtype)


def model_flops(config, batch) -> float | None:
  """Model FLOPs of one train step on a host batch (metrics.dit_train_flops from
  its real segment and caption lengths); None for the U-Net family."""
  if _model_family(config) != "dit":
    return None
  size = dit.VARIANTS[config.model.variant]
  k = config.data.examples_per_row

  def per_example(ids):  # [B, L] ids (0 = padding) -> [B, K] token counts; runs every step on the host
    return np.stack([np.bincount(row, minlength=k + 1)[1:k + 1] for row in np.asarray(ids)])

  segment_ids = np.asarray(batch["segment_ids"])
  lengths = per_example(segment_ids)
  present = lengths > 0
  text_dim = int(config.model.text_dim)
  text_lengths = None
  if text_dim and "text_segment_ids" in batch:
    text_lengths = [row[p] for row, p in zip(per_example(batch["text_segment_ids"]), present)]
  with_cond = 0
  if "cond_mask" in batch:
    with_cond = int(np.sum(per_example(segment_ids * np.asarray(batch["cond_mask"])) > 0))
  learn_sigma = bool(config.model.learn_sigma)
  return metrics.dit_train_flops(
      width=size["width"], depth=size["depth"], patch_dim=patch_dim(config),
      out_dim=(2 if learn_sigma else 1) * patch_dim(config), mlp_ratio=float(config.model.mlp_ratio),
      segment_lengths=[row[p] for row, p in zip(lengths, present)], text_dim=text_dim, text_lengths=text_lengths,
      clocks=int(present.sum()) + with_cond, adaln=config.model.adaln,
      pooled_text=bool(config.model.pooled_text))


def make_objective(config):
  """The objective of config.diffusion.kind (diffusion/kinds.py), what loss_fn and eval_fn get."""
  return kinds.make_objective(config)


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
      **_dummy_text(config, rows),
  )


def _dummy_text(config, rows: int) -> dict:
  if not uses_text(config):
    return {}
  lt = int(config.data.text_tokens_per_row)
  return dict(text=np.zeros((rows, lt, int(config.model.text_dim)), np.float32),
              text_segment_ids=np.ones((rows, lt), np.int32))


def apply_model(model, params, x, t, batch, *, train=False, rngs=None, labels=None, text_null=None):
  """The backbone on packed tokens x [B, L, P] at per-token model times t [B, L],
  with the batch's segments, positions, labels and (when present) packed text."""
  kwargs = {}
  if "text" in batch:
    kwargs = dict(text=batch["text"], text_segment_ids=batch["text_segment_ids"])
    if text_null is not None:
      kwargs["text_null"] = text_null
  labels = batch["labels"] if labels is None else labels
  out = model.apply({"params": params}, x, t.astype(jnp.float32), labels, batch["segment_ids"], batch["positions"],
                    train=train, rngs=rngs or {}, **kwargs)
  return out.astype(jnp.float32)


def init_params(model, config, rng):
  batch = dummy_batch(config, 1)
  t = jnp.zeros(batch["segment_ids"].shape, jnp.float32)
  text = {k: batch[k] for k in ("text", "text_segment_ids") if k in batch}
  return model.init({"params": rng}, batch["patches"], t, batch["labels"], batch["segment_ids"],
                    batch["positions"], train=False, **text)["params"]


def frame_cond_mask(rng, batch, probs: dict, max_frames: int = 256):
  """[B, L] bool: tokens that become clean context under a random conditioning mode.

  Per video example (more than one latent frame) one mode is drawn with the
  probabilities of `probs` (the rest: none): i2v = frame 0; extend = frames
  < n, n uniform in [1, T' - 1]; interpolate = frames 0 and T' - 1; random =
  each frame with probability 1/2, the last frame always left to predict.
  Images never get context (they would keep no loss).
  """
  segment_ids, positions, grid = batch["segment_ids"], batch["positions"], batch["grid"]
  rows, k = grid.shape[:2]
  mode_rng, extend_rng, random_rng = jax.random.split(rng, 3)
  thresholds = np.cumsum([float(probs.get(m, 0.0)) for m in COND_MODES])
  u = jax.random.uniform(mode_rng, (rows, k))
  mode = jnp.searchsorted(jnp.asarray(thresholds, jnp.float32), u, side="right")  # len(COND_MODES) = none
  frames = grid[..., 0]
  n_extend = jax.random.randint(extend_rng, (rows, k), 1, jnp.maximum(frames, 2))
  random_frames = jax.random.bernoulli(random_rng, 0.5, (rows, k, max_frames))
  tok_mode, tok_frames, tok_extend = (objectives.per_token(v, segment_ids) for v in (mode, frames, n_extend))
  frame = positions[..., 0]
  tok_random = jnp.take_along_axis(objectives.per_token(random_frames, segment_ids),
                                   jnp.minimum(frame, max_frames - 1)[..., None], axis=-1)[..., 0]
  last = frame == tok_frames - 1
  cond = ((tok_mode == 0) & (frame == 0)) | ((tok_mode == 1) & (frame < tok_extend)) | \
         ((tok_mode == 2) & ((frame == 0) | last)) | ((tok_mode == 3) & tok_random & ~last)
  return cond & (tok_frames > 1) & (segment_ids > 0)


def loss_fn(params, model, objective, batch, rng, config, *, train=True):
  """Diffusion loss of one packed batch; each example weighs the same (see reduce_per_example)."""
  t_rng, noise_rng, dropout_rng, cond_rng = jax.random.split(rng, 4)
  x0 = batch["patches"]
  segment_ids = batch["segment_ids"]
  k = batch["labels"].shape[1]
  cond_mask = batch["cond_mask"]
  cond_probs = dict(config.diffusion.cond)
  if train and any(cond_probs.values()):
    cond_mask = cond_mask | frame_cond_mask(cond_rng, batch, cond_probs)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  t_example = objective.sample_times(t_rng, segment_ids, k)
  # Conditioning tokens stay clean (t = 0) and carry no loss.
  t = jnp.where(cond_mask, 0, objectives.per_token(t_example, segment_ids))
  x_t, model_time = objective.corrupt(x0, noise, t, cond_mask)
  out = apply_model(model, params, x_t, model_time, batch, train=train, rngs={"dropout": dropout_rng})
  token_loss = objective.token_loss(out, x0, x_t, t, noise)
  loss_mask = (segment_ids > 0) & ~cond_mask
  loss = objectives.reduce_per_example(token_loss, segment_ids, loss_mask, k)
  buckets = timestep_bucket_losses(token_loss, segment_ids, loss_mask, objective.timestep_index(t_example),
                                   objective.num_timesteps)
  return loss, {"loss": loss, **buckets}


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
  bucket_of_token = objectives.per_token(t_example * NUM_T_BUCKETS // num_steps, segment_ids)
  ids = jnp.arange(1, k + 1, dtype=segment_ids.dtype)
  out = {}
  for i in range(NUM_T_BUCKETS):
    mask = loss_mask & (bucket_of_token == i)
    out[f"loss_t{i}"] = objectives.reduce_per_example(token_loss, segment_ids, mask, k)
    present = jnp.any((segment_ids[..., None] == ids) & mask[..., None], axis=1)  # [B, K]
    out[f"examples_t{i}"] = jnp.sum(present).astype(jnp.float32)
  return out


make_dataset = pipeline.make_dataset  # packed rows of the configured tfds dataset


def eval_fn(params, model, objective, batch, index, config) -> dict:
  """Held-out loss of eval batch number `index`, deterministic: train=False
  (no dropout, no label dropout) and timesteps and noise drawn from a key
  fixed by (train.seed, index), so evaluations of the same params at
  different steps see the same noise and compare directly."""
  rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed + 1), index)
  _, aux = loss_fn(params, model, objective, batch, rng, config, train=False)
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


def generate(model, params, config, rows: dict, rng, *, sampler="euler", steps=30, cfg_scale=1.0, eta=0.0):
  """Samples every example of packed rows in one compiled loop; returns x0 tokens [B, L, P].

  `rows` follows the packed-batch contract (segment_ids, positions, grid,
  labels, and text/text_segment_ids for text models) plus what the modes need:
    cond_mask [B, L]   tokens given as context (i2v: the first latent frame;
                       extension: the first frames; interpolation: first and
                       last), held at their `patches` values and t = 0;
    patches [B, L, P]  the given tokens' values, and for SDEdit the clip to edit;
    strength [B, K]    1 = start from pure noise (text-to-video and the frame
                       modes); s < 1 = SDEdit: start at time s from
                       (1 - s) x_edit + s noise (flow) or at step s T (DDPM),
                       each example at its own strength whatever the sampler;
    negative_text_segment_ids [B, Lt]  (optional) the text segment ids of CFG's
                       unconditional half: example k's negative-prompt tokens carry
                       k (and 0 in text_segment_ids), for examples without one their
                       caption's; has_negative [B, K] marks the examples with one.
  CFG (cfg_scale != 1, samplers.guided_model_fn) runs the conditional and the
  unconditional model as one batch: the unconditional branch has every caption
  replaced by the null caption and every label by the null class. The samplers
  are the objective's (diffusion/kinds.py): flow 'euler', 'heun' on per-token
  clocks (flow_time_grid; each example shifted by its own token count); DDPM
  'ddim', 'ddpm' (a pixel model's x0 clipped to [-1, 1]), where SDEdit takes one
  strength for the whole call, `ddpm_strength` (a Python float: it fixes the step count).
  Jit it with model, config, sampler, steps, cfg_scale, eta and ddpm_strength static.
  """
  objective = make_objective(config)
  segment_ids = rows["segment_ids"]
  given = jnp.asarray(rows["patches"], jnp.float32)
  strength = jnp.asarray(rows.get("strength", jnp.ones(rows["grid"].shape[:2])), jnp.float32)
  noise_rng, sample_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, given.shape, jnp.float32)

  def model_fn(x, t_model):
    return apply_model(model, params, x, t_model, rows)

  if cfg_scale != 1.0:
    both = jax.tree_util.tree_map(lambda v: jnp.concatenate([v, v], axis=0),
                                  {key: rows[key] for key in ("segment_ids", "positions", "text", "text_segment_ids")
                                   if key in rows})
    text_null = jnp.ones(rows["labels"].shape, bool)
    if "negative_text_segment_ids" in rows:  # the unconditional branch reads the negative prompts' tokens
      both["text_segment_ids"] = jnp.concatenate([rows["text_segment_ids"], rows["negative_text_segment_ids"]])
      text_null = ~jnp.asarray(rows["has_negative"], bool)
    both_text_null = jnp.concatenate([jnp.zeros_like(text_null), text_null], axis=0)

    def apply_both(x, t_model, labels):  # guided_model_fn's batch: the rows, then the same rows unconditional
      return apply_model(model, params, x, t_model, both, labels=labels, text_null=both_text_null)

    null_labels = jnp.full_like(rows["labels"], int(config.model.num_classes))
    model_fn = samplers.guided_model_fn(apply_both, rows["labels"], null_labels, cfg_scale, objective.learn_sigma)
  return objective.sample(model_fn, given, noise, sample_rng, segment_ids=segment_ids, cond_mask=rows["cond_mask"],
                          strength=strength, sampler=sampler, steps=steps, eta=eta)
