"""A CoCa-style video captioner (models/captioner.py) trained on moving_digits' dense captions; it
writes the captions of `python -m diffusion_jax recaption`.

  python -m diffusion_jax train --config=configs/captioner.py --workdir=/tmp/captioner
  python -m diffusion_jax recaption --captioner=/tmp/captioner --source=moving_digits \
      --builder='{"min_side": 24, "max_side": 40, "max_digits": 1, "durations": [1, 5, 9]}' --out=/tmp/recaptioned

Arguments after the colon (comma separated):
  smoke        seconds, for tests: a tiny net on a tiny build, a few steps
  quickstart   a shorter run of the same recipe (600 steps instead of 1500)
The data is moving_digits at the quickstart's clip sizes (one digit, 24-40 px sides, 1/5/9 frames,
digits 50-70% of the shorter side), with more training clips (20000) so the run does not overfit;
validation clips draw on the 200 digit images train never sees. The encoder reads all 9 frames
of a clip on a 40 x 40 canvas (the largest side, so no clip is resized and a speed in px per frame
is kept), as one token per frame: a crop around the frame's foreground and its geometry
(models/captioner.py).
"""
import ml_collections

from diffusion_jax import config_defaults
from diffusion_jax.data.moving_digits import QUICKSTART_DATA

# The quickstart's moving_digits build with more training clips; seed 0, so its first 3000 training
# clips are the quickstart's and its validation digits are held out.
MOVING_DIGITS = dict(QUICKSTART_DATA, train_examples=20000, validation_examples=512)


def get_config(arg: str = ""):
  from diffusion_jax.config import parse_arg
  from diffusion_jax.models import captioner

  arg = parse_arg(arg, smoke=False, quickstart=False)
  c = ml_collections.ConfigDict()
  c.task = "captioner"

  c.data = dict(
      name="moving_digits",
      data_dir="",  # "" = $DIFFUSION_JAX_DATA or ~/.cache/diffusion_jax/data
      split="train",
      eval_split="validation",
      builder=dict(MOVING_DIGITS),
      shuffle_seed=0,
      num_workers=0,
  )

  c.model = dict(
      # MiniLM ids of the output vocabulary: [PAD], [CLS], [SEP] and the caption generator's tokens
      token_ids=captioner.caption_token_ids(),
      max_length=24,  # BOS + caption + EOS; the longest moving_digits caption of one digit has 19
      frames=9,  # the first 9 frames are read (the build's longest clip)
      canvas=40,  # clips are centred on a 40 x 40 canvas (scaled down only when larger)
      crop=24,  # each frame's foreground window, resampled to 24 x 24 (the digit classifier's input size)
      crop_widths=(16, 32, 64),  # 3x3 conv + 2x2 max pool each: 24 -> 3 px
      width=128,
      heads=4,
      encoder_layers=2,  # over the 9 frame tokens (crop features + geometry)
      unimodal_layers=1,  # text only, gives the contrastive text embedding ([CLS] slot)
      multimodal_layers=2,  # text with cross-attention to the video tokens
      embed_dim=128,  # contrastive embedding width
  )

  c.train = dict(
      config_defaults.TRAIN,  # the loop's defaults (optimizer, resilience, ...), then the captioner's own
      global_batch=32,
      steps=600 if arg.quickstart else 1500,
      lr=1e-3,
      lr_schedule="cosine",
      warmup_steps=50,
      weight_decay=1e-4,
      ema_decay=0.99,
      caption_weight=2.0,  # CoCa's weights: 2 x captioning + 1 x contrastive
      contrastive_weight=1.0,
      log_every=50,
      ckpt_every=250,
      keep_ckpts=1,
      eval_every=250,  # greedy captions of eval_batches x global_batch held-out clips
      eval_batches=8,  # 256 clips
  )

  # Pure data parallelism: the captioner's params are small and replicated.
  c.mesh = dict(
      shape=(-1, 1, 1),
      axes=("data", "fsdp", "tensor"),
      rules=(("batch", ("data", "fsdp")),),
  )

  if arg.smoke:
    c.data.builder.update(min_side=16, max_side=16, train_examples=64, validation_examples=16)
    c.model.update(frames=5, canvas=16, crop=8, crop_widths=(8,), width=32, heads=2, encoder_layers=1,
                   multimodal_layers=1, embed_dim=32)
    c.train.update(global_batch=16, steps=30, warmup_steps=2, lr=3e-3, log_every=10, ckpt_every=30,
                   eval_every=30, eval_batches=1)
  return c
