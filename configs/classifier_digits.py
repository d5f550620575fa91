"""The project's digit classifier (evaluation's feature extractor), trained on real digits_canvas frames.

  python -m diffusion_jax train --config=configs/classifier_digits.py --workdir=/tmp/classifier
  python -m diffusion_jax export --workdir=/tmp/classifier --out=/tmp/classifier_export

Arguments after the colon (comma separated): image_size=<px> (the digits_canvas
canvas it trains on; the network resizes every frame to 24x24 inside, so it
classifies samples of any size), smoke (a few steps, for tests).
"""
import ml_collections


def get_config(arg: str = ""):
  from diffusion_jax.config import parse_arg

  arg = parse_arg(arg, image_size=32, smoke=False)
  c = ml_collections.ConfigDict()
  c.task = "classifier"

  c.data = dict(
      name="digits_canvas",  # or moving_digits (its single-digit clips, one random frame each)
      data_dir="",  # "" = $DIFFUSION_JAX_DATA or ~/.cache/diffusion_jax/data
      split="train",
      eval_split="validation",
      image_size=arg.image_size,  # frames are batched at this size (digits_canvas's canvas)
      channels=3,
      shuffle_seed=0,
      num_workers=0,
  )

  c.model = dict(
      num_classes=10,
      input_size=24,  # every frame is resized to this inside the network
      widths=(16, 32, 64),  # one 3x3 conv + 2x2 max pool each: 24 -> 3 px
      features=64,  # penultimate width: the feature space of FD / KID
  )

  c.train = dict(
      seed=0,
      global_batch=64,
      steps=800,  # ~5 epochs of the 9.6k training frames
      lr=3e-3,
      lr_schedule="cosine",
      warmup_steps=20,
      weight_decay=1e-4,
      grad_clip=1.0,
      ema_decay=0.99,
      compute_dtype="float32",
      log_every=100,
      ckpt_every=800,
      keep_ckpts=1,
      grad_accum_steps=1,
      max_consecutive_skips=20,
      eval_every=800,  # accuracy on eval_batches x global_batch validation frames, at the end
      eval_batches=15,  # 960 of the 1000 validation frames
      profile_steps=(0, 0),
  )

  # Pure data parallelism: the classifier's params are small and replicated.
  c.mesh = dict(
      shape=(-1, 1, 1),
      axes=("data", "fsdp", "tensor"),
      rules=(("batch", ("data", "fsdp")),),
  )

  if arg.smoke:
    c.model.update(widths=(8, 16, 16), features=16)
    c.train.update(global_batch=16, steps=4, warmup_steps=1, log_every=2, ckpt_every=4, eval_every=0,
                   eval_batches=1)
  return c
