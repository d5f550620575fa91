"""Text-to-image latent diffusion (Rombach et al. 2022) on the built-in digits: a U-Net or a DiT
denoising a VAE's latents, cross-attending to a frozen text encoder's caption tokens.

  # 1. A VAE. Images are one-frame videos, so the causal video VAE serves.
  python -m diffusion_jax train --config=configs/vae_video.py:quickstart --workdir=/tmp/vae
  # 2. Latents and caption embeddings of digits_canvas ("a red 3 on a navy background").
  python -m diffusion_jax encode --source=digits_canvas --builder='{"image_size": 32}' \
      --vae=/tmp/vae --out=/tmp/digit_latents
  # 3. The LDM, then images from prompts, decoded through the VAE.
  python -m diffusion_jax train --config=configs/ldm_digits.py:data=/tmp/digit_latents --workdir=/tmp/ldm
  python -m diffusion_jax sample --workdir=/tmp/ldm --prompt="a red 3 on a navy background"

Arguments after the colon (comma separated):
  data=<dir>         the encoded latent dataset (required)
  family=<unet|dit>  the backbone: models/unet.py (default; LDM's) or models/dit.py
  variant=<name>     a row of that family's VARIANTS (default: unet small, dit tiny)
  latent_size=<n>    side of the latents: the image side / the VAE's spatial factor (32 / 4 = 8)
  channels=<C>       the VAE's latent channels (training checks them against the dataset)
  smoke              seconds, for tests

The training run records the VAE, its latent statistics and the text encoder
in the saved config (__main__.record_conditioners), so `sample` decodes
exactly what training normalised. The U-Net, being convolutional, takes one
size (data.image_size = latent_size; latents of another size are skipped and
counted, a dataset of another size is an error); the DiT gets the same rows so
the two compare. For native sizes and durations use configs/video_dit.py.
"""
import ml_collections


def get_config(arg: str = ""):
  from diffusion_jax.config import ConfigError, parse_arg

  arg = parse_arg(arg, data="", family="unet", variant="", latent_size=8, channels=4, smoke=False)
  if not arg.data:
    raise ConfigError("configs/ldm_digits.py needs data=<dir>: a latent dataset written by "
                      "`python -m diffusion_jax encode --vae=...` (see this file's docstring)")
  if arg.family not in ("unet", "dit"):
    raise ConfigError(f"family={arg.family!r}: use unet or dit")
  unet = arg.family == "unet"
  variant = arg.variant or ("smoke" if arg.smoke else "small" if unet else "tiny")
  patch = 1 if unet else 2  # the U-Net sees the latent grid; the DiT patches it 2x2
  c = ml_collections.ConfigDict()
  c.task = "dit"  # the diffusion-backbone task; model.family picks the net

  c.data = dict(
      name=arg.data,
      data_dir="",
      split="train",
      eval_split="validation",
      image_size=arg.latent_size,  # every example: latent_size x latent_size latents
      patch=(1, patch, patch),
      channels=arg.channels,
      tokens_per_row=(arg.latent_size // patch) ** 2,  # exactly one image a row
      examples_per_row=1,
      text_tokens_per_row=32,  # one caption of <= text.max_length tokens
      shuffle_seed=0,
      num_workers=0,
  )

  c.model = dict(
      family=arg.family,
      variant=variant,
      num_classes=0,  # conditioning comes from the captions
      class_dropout_prob=0.0,
      text_dim=384,  # all-MiniLM-L6-v2's width (diffusion_jax/models/text.py)
      caption_dropout_prob=0.1,  # the null caption, for classifier-free guidance
      learn_sigma=False,
  )
  if not unet:
    c.model.update(pos_embedding="sincos2d", attention_backend="xla", scan_layers=True, scan_unroll=0, remat="none")

  c.diffusion = dict(
      kind="ddpm",  # LDM's objective: eps prediction, linear betas
      schedule="linear",
      num_steps=1000,
      prediction="eps",
  )

  c.train = dict(
      seed=0,
      global_batch=32,
      steps=3000,
      lr=3e-4,
      warmup_steps=200,
      weight_decay=0.0,
      grad_clip=1.0,
      ema_decay=0.999,
      compute_dtype="float32",
      log_every=100,
      ckpt_every=1000,
      keep_ckpts=2,
      grad_accum_steps=1,
      max_consecutive_skips=20,
      eval_every=1000,
      eval_media=True,  # at eval steps, samples of fixed classes / sample.prompts into TensorBoard
      eval_batches=4,
      profile_steps=(0, 0),
  )

  # Rules for both families' logical names (models/unet.py LOGICAL_NAMES, configs/dit_image.py).
  c.mesh = dict(
      shape=(-1, 1, 1),
      axes=("data", "fsdp", "tensor"),
      rules=(
          ("batch", ("data", "fsdp")),
          ("length", None),
          ("text_length", None),
          ("channels", "fsdp"),
          ("channels_in", None),
          ("context", None),
          ("embed", "fsdp"),
          ("embed_out", None),
          ("text_embed", None),
          ("mlp", "tensor"),
          ("modulation", None),
          ("heads", "tensor"),
          ("kv", None),
          ("patch", None),
          ("classes", None),
          ("layers", None),
      ),
  )

  # Filled at train time from the encoded dataset (__main__.record_conditioners).
  c.latent = dict(vae="", mean=(), std=())
  c.text = dict(encoder_dir="", max_length=32)

  c.sample = dict(sampler="ddim", steps=50, cfg_scale=4.0, seed=0, rows_per_call=16,
                  prompts=("a red 3 on a navy background", "a white 7 on a black background"),
                  size=(32, 32), frames=1)

  if arg.smoke:
    c.diffusion.num_steps = 100
    c.train.update(global_batch=8, steps=4, lr=1e-3, warmup_steps=1, log_every=2, ckpt_every=4, eval_every=0)
    c.sample.update(steps=3, rows_per_call=2, size=(4 * arg.latent_size,) * 2)
  return c
