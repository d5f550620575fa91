"""Sora-style video DiT: rectified flow over packed spacetime patches of native-size clips.

  python -m diffusion_jax data-stats --config=configs/video_dit.py
  python -m diffusion_jax train --config=configs/video_dit.py:data=/data/enc_latents,channels=4 --workdir=/tmp/vdit
  python -m diffusion_jax train --config=configs/video_dit.py:smoke --workdir=/tmp/vdit_smoke

Arguments after the colon (comma separated):
  variant=<S/2|B/4|XL/2|3B/2|tiny|smoke>  a row of models/dit.py's VARIANTS (default B/4 on pixels, B/2 on latents)
  data=<dir>     an encoded dataset (`python -m diffusion_jax encode`): VAE latents or pixels, with
                 caption embeddings; the model then cross-attends to the captions. Without it the
                 model trains unconditionally on the built-in `moving_digits` pixels.
  channels=<C>   channels of the data: 3 for pixels, the VAE's latent channels for latents
  text           caption cross-attention without naming a dataset (e.g. for launch/compile_check.py)
  smoke          seconds, for tests;  quickstart: the CPU text-to-video recipe of the quickstart
Images are one-frame videos: every row mixes them with clips of 5-33 frames.
"""
from diffusion_jax import config_defaults


def get_config(arg: str = ""):
  from diffusion_jax.config import parse_arg

  arg = parse_arg(arg, variant="", data="", channels=3, text=False, smoke=False, quickstart=False)
  latent = arg.channels != 3
  variant = arg.variant or ("smoke" if arg.smoke else "tiny" if arg.quickstart else "B/2" if latent else "B/4")
  patch = int(variant.split("/")[1]) if "/" in variant else 2
  text = arg.text or bool(arg.data)
  c = config_defaults.recipe(
      "dit",
      # Data: native sizes and durations, packed NaViT-style into rows of L tokens.
      data=dict(
          name=arg.data or "moving_digits",
          builder={},  # moving_digits' defaults: 24-96 px sides, 1/5/9/17/33 frames, 1-3 digits
          patch=(1, patch, patch),
          channels=arg.channels,
          tokens_per_row=4096,  # L
          examples_per_row=32,  # K
          text_tokens_per_row=32 * 32 if text else 0,  # Lt: K captions of <= 32 tokens each always fit
          pack_buffer=64,
      ),
      model=dict(
          variant=variant,
          text_dim=384 if text else 0,  # all-MiniLM-L6-v2's width (diffusion_jax/models/text.py)
          pooled_text=True,  # with text: the mean caption token joins c too (SD3), not only cross-attention
          learn_sigma=False,
          pos_embedding="rope3d",
          rope_split=(0.25, 0.375, 0.375),  # head-dim share of (t, h, w)
          qk_norm=True,
      ),
      diffusion=dict(
          kind="flow",  # rectified flow
          shift_base_tokens=256,  # t-shift s = sqrt(tokens of the example / 256)
          cond=dict(i2v=0.1, extend=0.05, interpolate=0.05, random=0.05),  # conditioning-frame modes in training
          prediction="v",
      ),
      train=dict(global_batch=8, steps=100_000, lr=1e-4, warmup_steps=1000, ema_decay=0.9999,
                 compute_dtype="bfloat16", log_every=50, ckpt_every=1000, eval_every=1000),
      mesh=dict(shape=(1, -1, 1)),  # FSDP over every device by default
      **config_defaults.CONDITIONERS,
      sample=dict(sampler="euler", steps=30, cfg_scale=4.0, rows_per_call=4,
                  prompts=("a red 3 moving quickly to the right", "a green 7 moving slowly up"),
                  size=(32, 32), frames=9),
  )

  if arg.quickstart:
    # Latent clips of the quickstart data are 9-75 tokens. Attention is dense over a row (masked by
    # segment), so its cost grows with L^2 per row: 20 rows of 96 tokens (~3 clips, 64 caption
    # tokens) do the work of 8 rows of 256 at 1.65x the real tokens/s on this CPU (BENCHMARKS.md).
    c.data.update(tokens_per_row=96, examples_per_row=6, text_tokens_per_row=64 if text else 0, pack_buffer=32,
                  cache_examples=True,  # a few MB of latents: read and decoded once, not every epoch
                  read_threads=0)  # prepared in the main thread: reader threads cost 3.7x the host time per batch here
    # The checks keep rising with steps (prompted digit 0.10 at 1200 steps, 0.40 at 2000: BENCHMARKS.md);
    # 2000 is what the quickstart's 15 minutes leave for this stage. So far from converged, a constant
    # lr learns more than a cosine decaying from the start, and a larger one more still (held-out loss at
    # 1800 steps: 0.453 cosine from 1e-3, 0.420 constant 1e-3, 0.386 at 2e-3, 0.379 at 4e-3). Held at 4e-3
    # for half the run and then cooled down linearly to 0 ("wsd"), it shows the prompted digit in 46% of
    # 160 held-out clips against 33% for the constant rate (1800 steps each; BENCHMARKS.md).
    # Muon on the blocks' matrices (AdamW on the rest) at twice the rate learns more per step than AdamW
    # at no cost in time: held-out loss 0.308 -> 0.276, prompted digit 0.51 -> 0.67 and direction
    # 0.85 -> 0.90 over 160 clips, 2000 steps each; 1x, 3x and 4x the rate did less (BENCHMARKS.md).
    c.train.update(global_batch=20, steps=2000, lr=4e-3, lr_schedule="wsd", cooldown_fraction=0.5, warmup_steps=50,
                   optimizer="muon", muon_lr_scale=2.0, ema_decay=0.99, compute_dtype="float32", log_every=50,
                   ckpt_every=2000, eval_every=2000, eval_batches=2, eval_media=False)  # the quickstart's evaluate stage writes its samples
    # The clips are 9-75 tokens: with the 256-token base they would train at s = 0.2-0.5, i.e. mostly
    # at low noise, where motion and layout are already decided. A base of 8 gives s = 1.1-3.1, like
    # the big recipes' clips get: motion direction 0.11 at s = 1, 0.42 at base 8 (1200 steps each).
    c.diffusion.shift_base_tokens = 8
    c.mesh.shape = (-1, 1, 1)
    # Guidance: the sixth session's weaker model needed a strong push (prompted digit 0.33 / 0.40 / 0.475
    # at scales 2 / 5.5 / 7). Today's (Muon, on the Muon VAE's latents) shows the digit as often at 5
    # as at 7 (0.84 over 320 held-out clips each), moves the prompted way more often (0.90 vs 0.87)
    # with a lower FD (118 vs 128); 10 does less; 40 sampling steps no more than 20 (BENCHMARKS.md).
    c.sample.update(steps=20, size=(32, 32), frames=9, cfg_scale=5.0)

  if arg.smoke:
    c.data.update(builder=dict(min_side=16, max_side=24, durations=(1, 5, 9), train_examples=64,
                               validation_examples=16),
                  tokens_per_row=256, examples_per_row=8, text_tokens_per_row=8 * 32 if text else 0,
                  pack_buffer=8)
    c.train.update(global_batch=8, steps=20, lr=1e-3, warmup_steps=2, ema_decay=0.999, compute_dtype="float32",
                   log_every=5, ckpt_every=10, eval_every=0)
    c.mesh.shape = (-1, 1, 1)
    c.sample.update(steps=4, size=(16, 16), frames=5)
  return c
