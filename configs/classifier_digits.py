"""The project's digit classifier (evaluation's digit check and feature extractor), trained on real
moving_digits frames.

  python -m diffusion_jax train --config=configs/classifier_digits.py --workdir=/tmp/classifier
  python -m diffusion_jax export --workdir=/tmp/classifier --out=/tmp/classifier_export

Arguments after the colon (comma separated):
  data=moving_digits  (default) one random frame of a single-digit moving_digits clip: every canvas
                      size and aspect (24-96 px sides), digit colour and background, 1/5/9 frames;
                      validation frames come from the 200 digit images train never sees
  data=digits_canvas  the older one-frame square canvases (image_size px)
  image_size=<px>     frames are batched at this square size (default: 96, moving_digits's largest
                      side, each frame padded to a square with its background; digits_canvas: 32).
                      The network brings every frame to model.input_size inside (moving_digits: a
                      window around the digit, model.locate), so it classifies samples of any size
  smoke               a few steps of a tiny net, for tests
"""
from diffusion_jax import config_defaults

# The moving_digits build the classifier trains on (moving_digits.MovingDigits arguments): one digit per
# clip, so a clip's label is its only digit; seed 0 holds out the same 200 digit images as every
# other seed-0 moving_digits build (the quickstart's included), so evaluation's real clips are unseen.
# Digits from 30% to 80% of the canvas side cover the default build and the quickstart's larger digits.
MOVING_DIGITS = dict(max_digits=1, durations=(1, 5, 9), digit_scale=(0.3, 0.8), train_examples=6000,
                     validation_examples=1000)


def get_config(arg: str = ""):
  from diffusion_jax.config import ConfigError, parse_arg

  arg = parse_arg(arg, data="moving_digits", image_size=0, smoke=False)
  if arg.data not in ("moving_digits", "digits_canvas"):
    raise ConfigError(f"data={arg.data!r}: the classifier trains on moving_digits or digits_canvas")
  c = config_defaults.recipe(
      "classifier",
      data=dict(
          name=arg.data,
          builder=dict(MOVING_DIGITS) if arg.data == "moving_digits" else {},
          image_size=arg.image_size or (96 if arg.data == "moving_digits" else 32),  # batched at this square size
          channels=3,
      ),
      model=dict(
          num_classes=10,
          input_size=24,  # every frame is resized to this inside the network
          widths=(16, 32, 64),  # one 3x3 conv + 2x2 max pool each: 24 -> 3 px
          features=64,  # penultimate width: the feature space of FD / KID
          locate=arg.data == "moving_digits",  # resample a window around the digit (canvases of any size)
      ),
      train=dict(
          global_batch=64,
          steps=300,  # 98.9% of held-out real frames (99.3% at 500); 300 keeps the quickstart within 15 minutes
          lr=3e-3,
          lr_schedule="cosine",
          warmup_steps=20,
          weight_decay=1e-4,
          ema_decay=0.99,
          log_every=100,
          ckpt_every=300,
          keep_ckpts=1,
          eval_every=300,  # accuracy on eval_batches x global_batch validation frames, at the end
          eval_batches=15,  # 960 validation frames (of 1000 clips / 1000 canvases)
      ),
      # Pure data parallelism: the classifier's params are small and replicated (its only named axis: batch).
  )

  if arg.smoke:
    c.model.update(widths=(8, 16, 16), features=16)
    c.train.update(global_batch=16, steps=4, warmup_steps=1, log_every=2, ckpt_every=4, eval_every=0,
                   eval_batches=1)
  return c
