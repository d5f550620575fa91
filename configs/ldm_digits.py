"""Text-to-image latent diffusion (Rombach et al. 2022) on the built-in digits: a U-Net or a DiT
denoising a VAE's latents, cross-attending to a frozen text encoder's caption tokens.

  # 1. A VAE (8 latent channels). Images are one-frame videos, so the causal video VAE serves.
  python -m diffusion_jax train --config=configs/vae_video.py:quickstart --workdir=/tmp/vae
  # 2. Latents and caption embeddings of digits_canvas ("a red 3 on a navy background").
  python -m diffusion_jax encode --source=digits_canvas --builder='{"image_size": 32}' \
      --vae=/tmp/vae --out=/tmp/digit_latents
  # 3. The LDM, then images from prompts, decoded through the VAE.
  python -m diffusion_jax train --config=configs/ldm_digits.py:data=/tmp/digit_latents --workdir=/tmp/ldm
  python -m diffusion_jax sample --workdir=/tmp/ldm --prompt="a red 3 on a navy background"

Arguments after the colon (comma separated):
  data=<dir>         the encoded latent dataset (required)
  family=<dit|unet>  the backbone: models/dit.py (default) or models/unet.py (LDM's own)
  variant=<name>     a row of that family's VARIANTS (default: unet small, dit tiny)
  latent_size=<n>    side of the latents: the image side / the VAE's spatial factor (32 / 4 = 8)
  channels=<C>       the VAE's latent channels, 8 for the quickstart's (training checks them)
  smoke              seconds, for tests

The training run records the VAE, its latent statistics and the text encoder
in the saved config (__main__.record_conditioners), so `sample` decodes
exactly what training normalised. The U-Net, being convolutional, takes one
size (data.image_size = latent_size; latents of another size are skipped and
counted, a dataset of another size is an error); the DiT gets the same rows so
the two compare. For native sizes and durations use configs/video_dit.py.
"""
from diffusion_jax import config_defaults


def get_config(arg: str = ""):
  from diffusion_jax.config import ConfigError, parse_arg

  arg = parse_arg(arg, data="", family="dit", variant="", latent_size=8, channels=8, smoke=False)
  if not arg.data:
    raise ConfigError("configs/ldm_digits.py needs data=<dir>: a latent dataset written by "
                      "`python -m diffusion_jax encode --vae=...` (see this file's docstring)")
  if arg.family not in ("unet", "dit"):
    raise ConfigError(f"family={arg.family!r}: use unet or dit")
  unet = arg.family == "unet"
  variant = arg.variant or ("smoke" if arg.smoke else "small" if unet else "tiny")
  patch = 1 if unet else 2  # the U-Net sees the latent grid; the DiT patches it 2x2
  c = config_defaults.recipe(
      "dit",  # the diffusion-backbone task; model.family picks the net
      data=dict(
          name=arg.data,
          fixed_size=True,  # every example: latent_size x latent_size latents
          image_size=arg.latent_size,
          patch=(1, patch, patch),
          channels=arg.channels,
          tokens_per_row=(arg.latent_size // patch) ** 2,  # exactly one image a row
          examples_per_row=1,
          text_tokens_per_row=32,  # one caption of <= text.max_length tokens
      ),
      model=dict(
          family=arg.family,
          variant=variant,
          class_dropout_prob=0.0,  # conditioning comes from the captions
          text_dim=384,  # all-MiniLM-L6-v2's width (diffusion_jax/models/text.py)
          learn_sigma=False,
          pooled_text=not unet,  # the DiT's pooled caption in c; the U-Net has no such path
      ),
      # Rectified flow, not LDM's DDPM eps objective: on the quickstart VAE's latents, 3000 steps,
      # 80 held-out captions, the prompted digit in 17.5% (U-Net, eps) and 8.8% (DiT, eps) of the
      # samples against 84% (U-Net) and 80% (DiT) by flow (BENCHMARKS.md, "Text-to-image latent
      # diffusion on the digits"). The shift s = sqrt(tokens / base) = 2 for both nets.
      diffusion=dict(kind="flow", prediction="v", shift_base_tokens=(arg.latent_size // patch) ** 2 // 4),
      # A short run's lr and EMA (the pixel DiT: 0.275 -> 0.45 of samples of their class at 1500 steps
      # for lr 1e-3 -> 3e-3 with EMA 0.999 -> 0.995). The DiT, with the pooled caption in c beside
      # the cross-attention (SD3), takes the larger lr and reaches 96% at 4500 steps.
      train=dict(global_batch=32, steps=3000 if unet else 4500, lr=1e-3 if unet else 3e-3, warmup_steps=100,
                 ema_decay=0.995, log_every=100, ckpt_every=1500, keep_ckpts=2, eval_every=1500),
      **config_defaults.CONDITIONERS,
      sample=dict(sampler="euler", steps=30, cfg_scale=4.0, rows_per_call=16,
                  prompts=("a red 3 on a navy background", "a white 7 on a black background"),
                  size=(32, 32), frames=1),
  )

  if arg.smoke:
    c.train.update(global_batch=8, steps=4, lr=1e-3, warmup_steps=1, log_every=2, ckpt_every=4, eval_every=0)
    c.sample.update(steps=3, rows_per_call=2, size=(4 * arg.latent_size,) * 2)
  return c
