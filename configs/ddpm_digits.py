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
import ml_collections


def get_config(arg: str = ""):
  from diffusion_jax.config import parse_arg

  arg = parse_arg(arg, variant="", smoke=False)
  variant = arg.variant or ("smoke" if arg.smoke else "small")
  image_size, patch = (16, 2) if arg.smoke else (32, 2)
  c = ml_collections.ConfigDict()
  c.task = "dit"  # the diffusion-backbone task; model.family picks the U-Net

  # Data: tfds dataset of one-frame videos, one image per row.
  c.data = dict(
      name="digits_canvas",
      data_dir="",  # "" = $DIFFUSION_JAX_DATA or ~/.cache/diffusion_jax/data
      split="train",
      eval_split="validation",
      image_size=image_size,
      patch=(1, patch, patch),  # (pt, ph, pw): the row layout only
      channels=3,
      tokens_per_row=(image_size // patch) ** 2,  # exactly one image
      examples_per_row=1,
      shuffle_seed=0,
      num_workers=0,  # Grain worker processes (0 = in the main process)
  )

  # Model: a row of diffusion_jax/models/unet.py's VARIANTS.
  c.model = dict(
      family="unet",
      variant=variant,
      num_classes=10,  # 0 = unconditional; label 10 is the null class (CFG)
      class_dropout_prob=0.1,
      learn_sigma=False,  # DDPM: fixed variances
      text_dim=0,  # text features for cross-attention; 0 = none
  )

  c.diffusion = dict(
      schedule="linear",  # DDPM's linear betas 1e-4 .. 0.02
      num_steps=1000,
      prediction="eps",
  )

  c.train = dict(
      seed=0,
      global_batch=32,  # rows (= images) per step, over all processes
      steps=3000,
      lr=2e-4,  # DDPM's CIFAR-10 learning rate
      warmup_steps=200,
      weight_decay=0.0,
      grad_clip=1.0,
      ema_decay=0.999,
      compute_dtype="float32",  # or bfloat16 (params stay float32)
      log_every=50,
      ckpt_every=500,
      keep_ckpts=3,
      grad_accum_steps=1,
      max_consecutive_skips=20,
      eval_every=500,
      eval_media=True,  # at eval steps, samples of fixed classes / sample.prompts into TensorBoard
      eval_batches=4,
      profile_steps=(0, 0),
  )

  # Mesh: -1 takes the rest of the devices. Logical -> mesh axis rules for the
  # U-Net's names (models/unet.py LOGICAL_NAMES): output channels of convs and
  # 1x1 projections over 'fsdp', the time-embedding MLP as the DiT's.
  c.mesh = dict(
      shape=(-1, 1, 1),
      axes=("data", "fsdp", "tensor"),
      rules=(
          ("batch", ("data", "fsdp")),
          ("length", None),
          ("channels", "fsdp"),
          ("channels_in", None),
          ("embed", "fsdp"),
          ("mlp", "tensor"),
          ("patch", None),
          ("classes", None),
          ("context", None),
      ),
  )

  c.sample = dict(sampler="ddim", steps=50, eta=0.0, cfg_scale=2.0, per_class=8, seed=0)

  if arg.smoke:
    c.diffusion.num_steps = 100
    c.train.update(global_batch=8, steps=20, lr=1e-3, warmup_steps=2, log_every=5, ckpt_every=10, eval_every=0)
    c.sample.update(steps=5, per_class=2)
  return c
