"""Class-conditional DiT on the built-in digits (images are one-frame videos).

  python -m diffusion_jax train --config=configs/dit_image.py:variant=S/2 --workdir=/tmp/dit_image
  python -m diffusion_jax train --config=configs/dit_image.py:smoke --workdir=/tmp/dit_smoke

Arguments after the colon (comma separated): variant=<S/2|B/4|...|tiny|smoke>,
quickstart (16 px digits, 9000 steps at ~8.5 steps/s on a 2-core CPU), smoke (seconds, for tests).
"""
from diffusion_jax import config_defaults


def get_config(arg: str = ""):
  from diffusion_jax.config import parse_arg

  arg = parse_arg(arg, variant="", quickstart=False, smoke=False)
  variant = arg.variant or ("smoke" if arg.smoke else "tiny")
  patch = int(variant.split("/")[1]) if "/" in variant else 2  # S/4 -> 4; tiny and smoke use 2
  c = config_defaults.recipe(
      "dit",
      # Data: tfds dataset of one-frame videos, packed into rows of `tokens_per_row`.
      data=dict(
          name="digits_canvas",
          fixed_size=True,  # every example is image_size x image_size: class grids sample that size
          image_size=32,
          patch=(1, patch, patch),  # (pt, ph, pw) of the spacetime patches
          channels=3,
          tokens_per_row=256,  # L: fixed token budget of a packed row
          examples_per_row=1,  # K: at most this many examples share a row
      ),
      # Model: a row of diffusion_jax/models/dit.py's VARIANTS, or "tiny" for CPU.
      model=dict(variant=variant, num_classes=10),
      # diffusion: DDPM, linear betas, eps prediction, learned variance (the defaults)
      train=dict(global_batch=32, steps=3000, lr=3e-4, warmup_steps=200, log_every=50, ckpt_every=500,
                 eval_every=500),
      sample=dict(sampler="ddim", steps=50, cfg_scale=4.0, per_class=8),
  )

  if arg.quickstart:
    c.data.image_size = 16
    c.data.tokens_per_row = 64
    # Rectified flow with the timestep shift s = 2 (64 tokens / base 16), a short run's lr and EMA and
    # 9000 steps (BENCHMARKS.md, "Class-conditional pixel DiT quickstart"): the classifier finds the
    # class in 96% of samples (95% with other noise); at 1500 steps 45%. The old recipe (DDPM eps,
    # lr 1e-3, EMA 0.999, 1500 steps) reached 14%, the same flow recipe at lr 1e-3 / EMA 0.999 28%.
    c.model.learn_sigma = False
    c.diffusion.update(kind="flow", prediction="v", shift_base_tokens=16)
    c.train.update(global_batch=32, steps=9000, lr=3e-3, warmup_steps=100, ema_decay=0.995, log_every=100,
                   ckpt_every=1500, eval_every=1500)
    c.sample.update(sampler="euler", steps=30, per_class=8)

  if arg.smoke:
    c.data.image_size = 16
    c.data.tokens_per_row = 64
    c.diffusion.num_steps = 100
    c.train.update(global_batch=8, steps=20, warmup_steps=2, log_every=5, ckpt_every=10, eval_every=0)
    c.sample.update(steps=5, per_class=2)
  return c
