"""Causal video VAE (images are one-frame videos) on the built-in moving digits.

  python -m diffusion_jax train --config=configs/vae_video.py:quickstart --workdir=/tmp/vae_quick
  python -m diffusion_jax train --config=configs/vae_video.py:quickstart,long_clips --workdir=/tmp/vae_quick \
      --allow-change=train.lr,train.lr_schedule,train.warmup_steps
  python -m diffusion_jax train --config=configs/vae_video.py:variant=video16 --workdir=/tmp/vae_video16
  python -m diffusion_jax train --config=configs/vae_video.py:smoke --workdir=/tmp/vae_smoke

Arguments after the colon (comma separated): variant=<smoke|small|small_image|
sd|video4|video8|video16> (models/vae.py's VARIANTS), latent_channels=<n>
(0 = the variant's), autoencoder (deterministic, no KL), gan (a 3D patch
discriminator from loss.gan_start on), quickstart (~5 minutes on a 2-core
CPU), long_clips (with quickstart: its second stage, 300 more steps on 9-frame
clips, resuming the first stage's workdir), smoke (seconds, for tests).

The checkpoint stores the latents' per-channel mean/std (eval split, EMA
params) next to the config; inference.load_vae returns them.
"""
from diffusion_jax import config_defaults


def get_config(arg: str = ""):
  from diffusion_jax.config import parse_arg

  arg = parse_arg(arg, variant="", latent_channels=0, autoencoder=False, gan=False, quickstart=False,
                  long_clips=False, smoke=False)
  variant = arg.variant or ("smoke" if arg.smoke else "small" if arg.quickstart else "video16")
  c = config_defaults.recipe(
      "vae",
      # Data: fixed-shape clips [B, frames, height, width, 3]; shorter clips and
      # images sit at frame 0 with a frame mask.
      data=dict(
          name="moving_digits",
          builder=dict(min_side=24, max_side=64, max_digits=2, durations=(1, 5, 9, 17), train_examples=2000,
                       validation_examples=200),
          frames=17,  # T = 1 + 4k
          min_frames=1,  # clips with fewer usable frames are skipped (1 = none)
          height=128,
          width=128,
          spatial="resize_crop",  # shorter side scaled to the crop's, then a random crop; or "crop"
          channels=3,
      ),
      model=dict(
          variant=variant,
          variational=not arg.autoencoder,
          latent_channels=arg.latent_channels,  # 0 = the variant's
          time_padding="zeros",  # before a clip's first frame: zeros or "replicate" (models/vae.py clip_start)
      ),
      loss=dict(
          l1_weight=1.0,
          l2_weight=0.0,
          kl_weight=0.0 if arg.autoencoder else 1e-4,  # per latent element, against per-pixel L1
          gan_weight=0.5 if arg.gan else 0.0,  # times VQGAN's adaptive weight
          gan_start=2000,  # discriminator and generator GAN terms from this step on
          disc_widths=(64, 128),
      ),
      train=dict(global_batch=16, steps=50000, lr=1e-4, lr_schedule="cosine", warmup_steps=500, log_every=100,
                 ckpt_every=2000,
                 eval_every=2000),  # PSNR/SSIM/latent stats of the EMA params on the fixed eval set
      # The VAE's params are replicated (data parallelism); its kernel and channel axes have names,
      # so a bigger one can be split by editing this table only.
      mesh=dict(rules=config_defaults.logical_rules(channels=None)),
  )

  if arg.quickstart:
    # The quickstart's own clips (one digit at 50-70% of a 24-40 px canvas), so that this command alone
    # trains the VAE the quickstart trains. Its earlier build (1-2 digits at 30-55% of 24-48 px, 1000
    # clips) kept the prompted digit of digits_canvas images but lost their colour: 26% of 80
    # reconstructions in the caption's digit colour against 94% for the quickstart's VAE.
    from diffusion_jax.data.moving_digits import QUICKSTART_DATA
    c.data.builder = dict(QUICKSTART_DATA)
    # Native-resolution 24 x 24 crops: encode and evaluate read the clips at their own scale (24-40 px
    # sides), so the VAE trains at that scale too; 32 x 32 crops of frames resized to a 32 px short side
    # never showed it the smallest digits, and cost twice the time per step. Checks on 200 held-out
    # reconstructions (BENCHMARKS.md): digit 0.75 -> 0.895, digit colour 0.725 -> 0.885, count
    # 0.645 -> 0.73, seam 1.37 -> 1.16 for 2400 steps of 24 x 24 against 1800 of 32 x 32, in less time.
    c.data.update(frames=5, height=24, width=24, spatial="crop")
    # Clips are prepared in the main thread: on a 2-core host Grain's reader threads only add GIL
    # hand-offs to the step's time (6.6 -> 3.7 ms of host time per batch; BENCHMARKS.md).
    c.data.read_threads = 0
    # L2 beside L1 learns colours and backgrounds sooner (20.6 vs 19.6 dB PSNR at step 600). The batch
    # decides the colours: batch 4 at lr 1e-3 or 2e-3 lost them (33-45% of held-out reconstructions in
    # the caption's digit colour), batch 8 keeps them (87%) on 32 x 32 crops; on 24 x 24 crops 1800
    # steps at batch 8 kept 50%, 2400 steps 89%, batch 12 for 1800 steps 98% (one run each).
    c.model.latent_channels = arg.latent_channels or 8
    c.loss.update(gan_start=2400, l2_weight=1.0)
    # Muon on the residual blocks' convolutions (AdamW on the rest) at AdamW's rate: 200 held-out
    # reconstructions keep the prompted digit in 92.6% (83.8% with AdamW), its colour in 100% (92%), the
    # count in 93% (77%), seam 1.09 (1.17), in the same time (BENCHMARKS.md, "Muon for the quickstart VAE").
    c.train.update(global_batch=8, steps=2400, lr=1e-3, warmup_steps=20, ema_decay=0.99, optimizer="muon",
                   log_every=100, ckpt_every=2400, keep_ckpts=1, eval_every=2400, eval_batches=8)
    if arg.long_clips:
      # A second stage on whole 9-frame clips, resumed from the first: trained on 5-frame crops, the VAE
      # reconstructs a 9-frame clip's frames 6-9 (its third latent frame) 2x worse than frames 1-5
      # (MAE 14-20 vs 7-8 grey levels) and the DiT's clips lose their digit there. 300 steps at a small,
      # cooling rate bring frames 6-9 to 11-13 and keep frames 1-5; the quickstart's DiT on the new
      # latents shows the prompted digit and direction more often (BENCHMARKS.md).
      c.data.update(frames=9, min_frames=9)
      c.train.update(steps=2700, lr=1e-5, lr_schedule="wsd", cooldown_fraction=300 / 2700, warmup_steps=1,
                     ckpt_every=2700, eval_every=2700)

  if arg.smoke:
    c.data.builder = dict(min_side=16, max_side=24, max_digits=1, durations=(1, 5, 6), train_examples=32,
                          validation_examples=8)
    c.data.update(frames=5, height=16, width=16)
    c.loss.update(gan_start=2, disc_widths=(8, 8))
    c.train.update(global_batch=8, steps=4, warmup_steps=1, lr=1e-3, log_every=2, ckpt_every=4, keep_ckpts=1,
                   eval_every=0, eval_batches=1)
  return c
