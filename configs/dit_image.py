"""Class-conditional DiT on the built-in digits (images are one-frame videos).

  python -m diffusion_jax train --config=configs/dit_image.py:variant=S/2 --workdir=/tmp/dit_image
  python -m diffusion_jax train --config=configs/dit_image.py:smoke --workdir=/tmp/dit_smoke

Arguments after the colon (comma separated): variant=<S/2|B/4|...|tiny|smoke>,
quickstart (16 px digits, a few minutes on a 2-core CPU), smoke (seconds, for tests).
"""
import ml_collections


def get_config(arg: str = ""):
  from diffusion_jax.config import parse_arg

  arg = parse_arg(arg, variant="", quickstart=False, smoke=False)
  variant = arg.variant or ("smoke" if arg.smoke else "tiny")
  patch = int(variant.split("/")[1]) if "/" in variant else 2  # S/4 -> 4; tiny and smoke use 2
  c = ml_collections.ConfigDict()
  c.task = "dit"

  # Data: tfds dataset of one-frame videos, packed into rows of `tokens_per_row`.
  c.data = dict(
      name="digits_canvas",
      data_dir="",  # "" = $DIFFUSION_JAX_DATA or ~/.cache/diffusion_jax/data
      split="train",
      eval_split="validation",
      image_size=32,
      patch=(1, patch, patch),  # (pt, ph, pw) of the spacetime patches
      channels=3,
      tokens_per_row=256,  # L: fixed token budget of a packed row
      examples_per_row=1,  # K: at most this many examples share a row
      shuffle_seed=0,
      num_workers=0,  # Grain worker processes (0 = in the main process)
  )

  # Model: a row of diffusion_jax/models/dit.py's VARIANTS, or "tiny" for CPU.
  c.model = dict(
      variant=variant,
      num_classes=10,
      class_dropout_prob=0.1,
      learn_sigma=True,
      pos_embedding="sincos2d",  # or "rope3d"
      attention_backend="xla",
      scan_layers=True,
      scan_unroll=0,  # layers per loop iteration; 0 = auto: unrolled on CPU (faster there), a loop elsewhere
      remat="none",  # none | full | dots
  )

  c.diffusion = dict(
      schedule="linear",  # linear | quadratic | cosine
      num_steps=1000,
      prediction="eps",  # eps | v | x0
  )

  c.train = dict(
      seed=0,
      global_batch=32,  # rows per step, over all processes
      steps=3000,
      lr=3e-4,
      warmup_steps=200,
      weight_decay=0.0,
      grad_clip=1.0,
      ema_decay=0.999,
      compute_dtype="float32",  # or bfloat16 (params stay float32)
      log_every=50,
      ckpt_every=500,
      keep_ckpts=3,
      grad_accum_steps=1,  # micro-batches per step (a lax.scan); the update is the global batch's
      max_consecutive_skips=20,  # stop after this many non-finite updates in a row (0 = never)
      eval_every=500,  # held-out loss per timestep bucket (EMA params) every this many steps; 0 = off
      eval_media=True,  # at eval steps, samples of fixed classes / sample.prompts into TensorBoard
      eval_batches=4,  # the fixed eval set: this many batches of data.eval_split
      profile_steps=(0, 0),  # (start, stop): trace steps start+1..stop into WORKDIR/profile; equal = off
  )

  # Mesh: -1 takes the rest of the devices. Logical -> mesh axis rules.
  c.mesh = dict(
      shape=(-1, 1, 1),
      axes=("data", "fsdp", "tensor"),
      rules=(
          ("batch", ("data", "fsdp")),
          ("length", None),
          ("embed", "fsdp"),
          ("mlp", "tensor"),
          # adaLN outputs stay whole: XLA's CPU SPMD partitioner miscomputes the
          # split of a tensor-sharded modulation on a (2, 2, 2) mesh
          # (tests/test_train.py checks that mesh against one device).
          ("modulation", None),
          ("heads", "tensor"),
          ("kv", None),
          ("patch", None),
          ("classes", None),
          ("layers", None),
      ),
  )

  c.sample = dict(sampler="ddim", steps=50, eta=0.0, cfg_scale=4.0, per_class=8, seed=0)

  if arg.quickstart:
    c.data.image_size = 16
    c.data.tokens_per_row = 64
    # A short CPU run learns faster with a higher lr and the plain eps loss
    # (learned sigma's VLB term helps sampling with few steps only later).
    c.model.learn_sigma = False
    c.train.update(global_batch=32, steps=1500, lr=1e-3, warmup_steps=100, log_every=100, ckpt_every=500)
    c.sample.update(steps=50, per_class=8)

  if arg.smoke:
    c.data.image_size = 16
    c.data.tokens_per_row = 64
    c.diffusion.num_steps = 100
    c.train.update(global_batch=8, steps=20, warmup_steps=2, log_every=5, ckpt_every=10, eval_every=0)
    c.sample.update(steps=5, per_class=2)
  return c
