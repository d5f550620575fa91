"""Class-conditional DDPM (Ho et al. 2020) with a U-Net on the built-in digits.

  python -m diffusion_jax train --config=configs/ddpm_digits.py --workdir=/tmp/ddpm_digits
  python -m diffusion_jax train --config=configs/ddpm_digits.py:smoke --workdir=/tmp/ddpm_smoke
  python -m diffusion_jax sample --workdir=/tmp/ddpm_smoke

Arguments after the colon (comma separated): variant=<small|smoke|ddpm_cifar>
(rows of diffusion_jax/models/unet.py's VARIANTS), smoke (seconds, for tests).

The U-Net is a convolutional net, so every packed row holds exactly one image
that fills it: examples_per_row = 1 and tokens_per_row = the image's patch
count (dit_task.validate enforces both). The patch size only sets the row
layout; the U-Net runs on the unpatchified pixels.
"""
from diffusion_jax import config_defaults


def get_config(arg: str = ""):
  from diffusion_jax.config import parse_arg

  arg = parse_arg(arg, variant="", smoke=False)
  variant = arg.variant or ("smoke" if arg.smoke else "small")
  image_size, patch = (16, 2) if arg.smoke else (32, 2)
  c = config_defaults.recipe(
      "dit",  # the diffusion-backbone task; model.family picks the U-Net
      # Data: tfds dataset of one-frame videos, one image per row.
      data=dict(
          name="digits_canvas",
          fixed_size=True,  # the U-Net's one grid
          image_size=image_size,
          patch=(1, patch, patch),  # (pt, ph, pw): the row layout only
          channels=3,
          tokens_per_row=(image_size // patch) ** 2,  # exactly one image
          examples_per_row=1,
      ),
      # Model: a row of diffusion_jax/models/unet.py's VARIANTS.
      model=dict(family="unet", variant=variant, num_classes=10, learn_sigma=False),  # DDPM: fixed variances
      # diffusion: DDPM's linear betas 1e-4 .. 0.02, eps prediction (the defaults)
      train=dict(global_batch=32, steps=3000, lr=2e-4,  # DDPM's CIFAR-10 learning rate
                 warmup_steps=200, log_every=50, ckpt_every=500, eval_every=500),
      sample=dict(sampler="ddim", steps=50, cfg_scale=2.0, per_class=8),
  )

  if arg.smoke:
    c.diffusion.num_steps = 100
    c.train.update(global_batch=8, steps=20, lr=1e-3, warmup_steps=2, log_every=5, ckpt_every=10, eval_every=0)
    c.sample.update(steps=5, per_class=2)
  return c
