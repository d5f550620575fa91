"""Task "vae": the autoencoder family of models/vae.py trained in the one loop.

Batches are fixed-shape (one example per row, never packed), so the train
step compiles once:
  video        uint8 [B, T, H, W, 3]  T = data.frames = 1 + 4k, H x W = data.height x data.width
  frame_mask   bool  [B, T]           the example's real frames
  example_ids  int64 [B]              the source's `id` (for exactly-once audits)
An image, or a clip shorter than T, sits at frame 0 of a T-frame example and
the rest is zero padding, masked out. A source clip is first trimmed to its
first 1 + 4*floor((T0-1)/4) frames (pipeline.allowed_frames): with the
causal VAE, latent frame j and reconstructed frames <= 4j then depend on
real frames only, so a masked example's real frames get exactly the latents
and reconstruction of the same clip alone (an image: its one-frame video's).

Loss (LDM's autoencoder objective, Rombach et al. 2022; VQGAN's adaptive GAN
weight, Esser et al. 2021), all masked to real frames:
  rec  = l1_weight * mean|x - x̂| + l2_weight * mean (x - x̂)^2 (per pixel)
  kl   = mean over real latent elements of KL(q(z|x) || N(0, I))
  loss = rec + kl_weight * kl [+ GAN terms once step >= loss.gan_start]
The decoder reconstructs a posterior sample (reparameterised) in training
and the posterior mean in evaluation; a deterministic autoencoder
(model.variational=False) always uses its code and must have kl_weight = 0.

GAN (loss.gan_weight > 0): a causal 3D patch discriminator with hinge
losses. The loop has one params tree and one optimizer, so both nets live in
one tree {"vae": ..., "disc": ...} and one loss whose gradient updates each
correctly: the generator term sees the discriminator through
stop_gradient(params["disc"]) (it moves the VAE only) and the discriminator
term sees stop_gradient(reconstruction) (it moves the discriminator only).
The generator term is scaled by VQGAN's adaptive weight
||grad_L rec|| / ||grad_L gan|| (L = the decoder's last convolution
kernel, clipped to [0, 1e4], no gradient) times gan_weight.

Latent statistics: the per-channel mean and std of posterior samples
z = mean + exp(logvar / 2) n (what the data pipeline feeds diffusion, so
std^2 = Var(mean) + E[exp(logvar)]) over the fixed eval set (EMA params) are
saved WITH every checkpoint, computed at
that step (checkpoint_extras), and inference.load_vae returns them: a latent
diffusion model normalises with exactly the statistics of the VAE params it
encodes with.

Task interface: see the TASKS comment in train/loop.py.
"""
import dataclasses

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import metrics
from diffusion_jax.config import ConfigError
from diffusion_jax.data import imaging, pipeline, sources
from diffusion_jax.models import vae as vae_lib

LOSS_TAKES_STEP = True  # the loop passes step= to loss_fn (the GAN switches on at loss.gan_start)


# --------------------------------------------------------------------------- discriminator

class PatchDiscriminator3D(nn.Module):
  """PatchGAN (pix2pix / VQGAN) in 3D: causal convolutions, spatial stride 2, LeakyReLU(0.2);
  one logit per (frame, patch). Causal in time, so the logits of real frames
  never see a masked example's padding."""

  widths: tuple = (32, 64)

  @nn.compact
  def __call__(self, video):
    x = video
    for i, width in enumerate(self.widths):
      x = vae_lib.CausalConv3d(width, (3, 4, 4), (1, 2, 2), name=f"conv_{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    return vae_lib.CausalConv3d(1, (3, 3, 3), name="logits")(x)[..., 0]  # [B, T, h, w]


# --------------------------------------------------------------------------- task interface

def validate(config) -> None:
  data, model, loss = config.data, config.model, config.loss
  if model.variant not in vae_lib.VARIANTS:
    raise ConfigError(f"model.variant={model.variant!r} is not a VAE variant; valid: "
                      f"{sorted(vae_lib.VARIANTS)}")
  if int(data.channels) != 3:
    raise ConfigError(f"data.channels={data.channels}: the VAE task reads RGB frames (3 channels)")
  vae = build_model(config)
  frames = int(data.frames)
  if frames < 1 or (frames - 1) % vae.temporal_factor:
    raise ConfigError(f"data.frames={frames} must be 1 + {vae.temporal_factor}k for variant {model.variant!r} "
                      f"(1, 5, 9, 17, ...)")
  if not 1 <= int(data.min_frames) <= frames:
    raise ConfigError(f"data.min_frames={data.min_frames} must be in [1, data.frames={frames}]")
  for name in ("height", "width"):
    if int(data[name]) < vae.spatial_factor or int(data[name]) % vae.spatial_factor:
      raise ConfigError(f"data.{name}={data[name]} must be a positive multiple of the spatial factor "
                        f"{vae.spatial_factor} of variant {model.variant!r}")
  if data.spatial not in ("resize_crop", "crop"):
    raise ConfigError(f"data.spatial={data.spatial!r} must be 'resize_crop' or 'crop'")
  for name in ("l1_weight", "l2_weight", "kl_weight", "gan_weight"):
    if float(loss[name]) < 0:
      raise ConfigError(f"loss.{name}={loss[name]} must be >= 0")
  if not model.variational and float(loss.kl_weight) > 0:
    raise ConfigError(f"loss.kl_weight={loss.kl_weight}: a deterministic autoencoder (model.variational=False) "
                      "has no posterior; set kl_weight=0")
  if float(loss.gan_weight) > 0 and (int(data.height) < 8 or int(data.width) < 8):
    raise ConfigError("the GAN's patch discriminator needs frames of at least 8x8 px")
  if int(loss.gan_start) < 0:
    raise ConfigError(f"loss.gan_start={loss.gan_start} must be >= 0")


def build_model(config) -> vae_lib.VideoVAE:
  return vae_lib.build_vae(config.model, dtype=jnp.dtype(config.train.compute_dtype))


def _discriminator(config) -> PatchDiscriminator3D:
  return PatchDiscriminator3D(widths=tuple(int(w) for w in config.loss.disc_widths))


def _uses_gan(config) -> bool:
  return float(config.loss.gan_weight) > 0


def init_params(model, config, rng):
  """{"vae": ..., "disc": ...} (the discriminator only with loss.gan_weight > 0).

  The params' shapes do not depend on the clip's size, so init traces the
  smallest input (one frame of 8 px or the spatial factor): its compile is
  seconds, not minutes.
  """
  side = max(8, model.spatial_factor)
  video = jnp.zeros((1, 1, side, side, 3), jnp.float32)
  vae_rng, disc_rng = jax.random.split(rng)
  params = {"vae": model.init(vae_rng, video)["params"]}
  if _uses_gan(config):
    params["disc"] = _discriminator(config).init(disc_rng, video)["params"]
  return params


def make_objective(config):
  del config  # no diffusion objective: loss_fn holds the whole loss
  return None


def _to_unit_range(video):
  """uint8 [0, 255] -> float32 [-1, 1]; float video is taken to be in [-1, 1] already."""
  if video.dtype == jnp.uint8:
    return video.astype(jnp.float32) / 127.5 - 1.0
  return video.astype(jnp.float32)


def _masked_mean(values, mask):
  """Mean of values [B, T] over the True entries of mask [B, T] (0 when none)."""
  mask = mask.astype(bool)
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def latent_mask(frame_mask, temporal_factor: int):
  """[B, T] real frames -> [B, 1 + (T-1)//f] real latent frames (latent j codes frames <= f*j)."""
  return frame_mask[:, ::temporal_factor]


def _reconstruction_terms(recon, video, mask, loss_config):
  per_frame_l1 = jnp.mean(jnp.abs(recon - video), axis=(2, 3, 4))
  per_frame_l2 = jnp.mean(jnp.square(recon - video), axis=(2, 3, 4))
  rec = (float(loss_config.l1_weight) * _masked_mean(per_frame_l1, mask)
         + float(loss_config.l2_weight) * _masked_mean(per_frame_l2, mask))
  return rec, per_frame_l2


def _latent_channel_stats(mean, logvar, lmask):
  """(sum, sum of E[z^2], count) per latent channel over the real latent frames, for posterior
  samples z = mean + exp(logvar / 2) n: E[z^2] = mean^2 + exp(logvar), no noise drawn."""
  weights = lmask.astype(jnp.float32)[:, :, None, None, None]
  count = jnp.sum(weights) * mean.shape[2] * mean.shape[3]
  second_moment = jnp.square(mean) + jnp.exp(logvar)
  return (jnp.sum(mean * weights, axis=(0, 1, 2, 3)), jnp.sum(second_moment * weights, axis=(0, 1, 2, 3)),
          count)


def loss_fn(params, model, objective, batch, rng, config, *, train=True, step=None):
  """(loss, aux): reconstruction + KL [+ GAN after loss.gan_start]; aux has loss, rec, kl,
  psnr, ssim (per real frame, averaged), gan terms, and latent_mean_c{i} / latent_std_c{i}."""
  del objective
  loss_config = config.loss
  video = _to_unit_range(batch["video"])
  mask = batch["frame_mask"].astype(bool)
  vae_params = params["vae"]
  mean, logvar = model.apply({"params": vae_params}, video, method=vae_lib.VideoVAE.encode)
  sample_rng, _ = jax.random.split(rng)
  z = vae_lib.sample(mean, logvar, sample_rng) if (train and model.variational) else mean
  gan = _uses_gan(config) and step is not None
  if gan:  # the last convolution applied here, so the adaptive weight can differentiate through it
    features = model.apply({"params": vae_params}, z, method=vae_lib.VideoVAE.decode_features)
    last = vae_params["decoder"]["conv_out"]

    def last_conv(kernel, feats):
      return vae_lib.causal_conv(feats, kernel, last["bias"], time_padding=model.time_padding).astype(jnp.float32)
    recon = last_conv(last["kernel"], features)
  else:
    recon = model.apply({"params": vae_params}, z, method=vae_lib.VideoVAE.decode)

  rec, per_frame_l2 = _reconstruction_terms(recon, video, mask, loss_config)
  lmask = latent_mask(mask, model.temporal_factor)
  kl_per_frame = jnp.mean(vae_lib.kl_to_standard_normal(mean, logvar), axis=(2, 3, 4))
  kl = _masked_mean(kl_per_frame, lmask) if model.variational else jnp.zeros(())
  loss = rec + float(loss_config.kl_weight) * kl

  aux = {}
  if gan:
    disc = _discriminator(config)
    frozen_disc = jax.lax.stop_gradient(params["disc"])
    fake = jnp.where(mask[:, :, None, None, None], recon, video)  # padding frames carry no signal

    def generator_loss(fake_video, disc_params):
      return -_masked_mean(jnp.mean(disc.apply({"params": disc_params}, fake_video), axis=(2, 3)), mask)

    g_loss = generator_loss(fake, frozen_disc)
    frozen_features, frozen_kernel = jax.lax.stop_gradient(features), jax.lax.stop_gradient(last["kernel"])
    rec_grad = jax.grad(lambda k: _reconstruction_terms(last_conv(k, frozen_features), video, mask,
                                                        loss_config)[0])(frozen_kernel)
    gan_grad = jax.grad(lambda k: generator_loss(
        jnp.where(mask[:, :, None, None, None], last_conv(k, frozen_features), video), frozen_disc))(frozen_kernel)
    adaptive = jnp.clip(jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4), 0.0, 1e4)
    adaptive = jax.lax.stop_gradient(adaptive)
    logits_real = jnp.mean(disc.apply({"params": params["disc"]}, video), axis=(2, 3))
    logits_fake = jnp.mean(disc.apply({"params": params["disc"]}, jax.lax.stop_gradient(fake)), axis=(2, 3))
    d_loss = 0.5 * (_masked_mean(jax.nn.relu(1.0 - logits_real), mask)
                    + _masked_mean(jax.nn.relu(1.0 + logits_fake), mask))
    on = (step >= int(loss_config.gan_start)).astype(jnp.float32)
    loss = loss + on * (float(loss_config.gan_weight) * adaptive * g_loss + d_loss)
    aux.update(g_loss=g_loss, d_loss=d_loss, adaptive_weight=adaptive, gan_on=on)

  recon_clipped = jnp.clip(recon, -1.0, 1.0)
  frame_psnr = metrics.psnr(recon_clipped, video)
  frame_ssim = metrics.ssim(recon_clipped, video)
  sums, squares, count = _latent_channel_stats(mean, logvar, lmask)
  channel_mean = sums / jnp.maximum(count, 1.0)
  channel_std = jnp.sqrt(jnp.maximum(squares / jnp.maximum(count, 1.0) - jnp.square(channel_mean), 0.0))
  aux.update(loss=loss, rec=rec, kl=kl, mse=_masked_mean(per_frame_l2, mask),
             psnr=_masked_mean(frame_psnr, mask), ssim=_masked_mean(frame_ssim, mask))
  for c in range(mean.shape[-1]):
    aux[f"latent_mean_c{c}"] = channel_mean[c]
    aux[f"latent_std_c{c}"] = channel_std[c]
  return loss, aux


def eval_fn(params, model, objective, batch, index, config) -> dict:
  """Sums over the batch's real frames (posterior means, no noise), for summarize_eval."""
  del objective, index
  video = _to_unit_range(batch["video"])
  mask = batch["frame_mask"].astype(bool)
  recon, mean, logvar = model.apply({"params": params["vae"]}, video, sample_posterior=False)
  weights = mask.astype(jnp.float32)
  per_frame_l1 = jnp.mean(jnp.abs(recon - video), axis=(2, 3, 4))
  per_frame_l2 = jnp.mean(jnp.square(recon - video), axis=(2, 3, 4))
  recon = jnp.clip(recon, -1.0, 1.0)
  lmask = latent_mask(mask, model.temporal_factor)
  kl = jnp.mean(vae_lib.kl_to_standard_normal(mean, logvar), axis=(2, 3, 4)) if model.variational \
      else jnp.zeros(lmask.shape)
  sums, squares, count = _latent_channel_stats(mean, logvar, lmask)
  return {"l1_sum": jnp.sum(per_frame_l1 * weights), "l2_sum": jnp.sum(per_frame_l2 * weights),
          "psnr_sum": jnp.sum(jnp.where(mask, metrics.psnr(recon, video), 0.0)),
          "ssim_sum": jnp.sum(jnp.where(mask, metrics.ssim(recon, video), 0.0)), "frames": jnp.sum(weights),
          "kl_sum": jnp.sum(kl * lmask), "latent_frames": jnp.sum(lmask.astype(jnp.float32)),
          "latent_sum": sums, "latent_squares": squares, "latent_count": count,
          "kl_weight": jnp.asarray(float(config.loss.kl_weight), jnp.float32)}


def summarize_eval(auxes: list[dict]) -> dict:
  """eval/loss (L1 + kl_weight * KL), eval/l1, eval/mse, eval/psnr,
  eval/ssim, eval/kl per real frame; eval/latent_mean_c{i}, eval/latent_std_c{i} per channel."""
  total = lambda key: sum(np.asarray(a[key], np.float64) for a in auxes)
  frames, latent_frames = max(float(total("frames")), 1.0), max(float(total("latent_frames")), 1.0)
  count = max(float(total("latent_count")), 1.0)
  mean = total("latent_sum") / count
  std = np.sqrt(np.maximum(total("latent_squares") / count - mean ** 2, 0.0))
  scores = {"eval/l1": float(total("l1_sum")) / frames, "eval/mse": float(total("l2_sum")) / frames,
            "eval/psnr": float(total("psnr_sum")) / frames, "eval/ssim": float(total("ssim_sum")) / frames,
            "eval/kl": float(total("kl_sum")) / latent_frames, "eval/frames": frames}
  kl_weight = float(auxes[0]["kl_weight"]) if auxes else 0.0
  scores["eval/loss"] = scores["eval/l1"] + kl_weight * scores["eval/kl"]
  for c, (m, s) in enumerate(zip(mean, std)):
    scores[f"eval/latent_mean_c{c}"] = float(m)
    scores[f"eval/latent_std_c{c}"] = float(s)
  return scores


def checkpoint_extras(scores: dict, config) -> dict:
  """The JSON saved with a checkpoint: the latent per-channel mean/std of that step's EMA params
  over the fixed eval set (the loop evaluates at every save for it)."""
  channels = sorted(int(k[len("eval/latent_mean_c"):]) for k in scores if k.startswith("eval/latent_mean_c"))
  return {"latent_stats": {"mean": [scores[f"eval/latent_mean_c{c}"] for c in channels],
                           "std": [scores[f"eval/latent_std_c{c}"] for c in channels],
                           "source": f"{config.data.name}:{config.data.eval_split}, "
                                     f"{int(config.train.eval_batches)} batches, EMA params, posterior samples"}}


# --------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class CropClip(grain.transforms.RandomMap):
  """tfds example -> {"video": uint8 [T, H, W, 3], "frame_mask": bool [T], "example_ids": int64}.

  Time: trim to the first 1 + 4*floor((T0-1)/4) frames; a longer clip is cut
  at a random start, a shorter one (an image included) sits at frame 0 with
  zero frames after it, masked out. Space: "resize_crop" scales the shorter
  side to the target's (antialiased bilinear) then crops at random; "crop"
  crops at native resolution (scaling up only a frame smaller than the target).
  """

  frames: int
  height: int
  width: int
  temporal_factor: int = 4
  spatial: str = "resize_crop"

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    video = np.asarray(element["video"])
    if video.ndim == 3:  # an image
      video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3:
      raise ValueError(f"example {element.get('id')}: video of shape {video.shape}, expected [T, H, W, 3]")
    kept = trimmed_frames(video.shape[0], self.temporal_factor)
    video = video[:kept]
    if kept > self.frames:
      start = int(rng.integers(0, kept - self.frames + 1))
      video = video[start:start + self.frames]
    h0, w0 = video.shape[1:3]
    scale = max(self.height / h0, self.width / w0)
    if self.spatial == "crop":
      scale = max(scale, 1.0)
    if scale != 1.0:
      new_h, new_w = max(self.height, round(h0 * scale)), max(self.width, round(w0 * scale))
      resized = imaging.resize_frames(video.astype(np.float32), new_h, new_w)
      video = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    top = int(rng.integers(0, video.shape[1] - self.height + 1))
    left = int(rng.integers(0, video.shape[2] - self.width + 1))
    video = video[:, top:top + self.height, left:left + self.width]
    real = video.shape[0]
    out = np.zeros((self.frames, self.height, self.width, 3), np.uint8)
    out[:real] = video
    return {"video": out, "frame_mask": np.arange(self.frames) < real,
            "example_ids": np.int64(element.get("id", -1))}


def trimmed_frames(frames: int, temporal_factor: int = 4) -> int:
  """1 + f*floor((T-1)/f): the longest prefix a causal VAE of temporal factor f takes."""
  if temporal_factor == 4:
    return pipeline.allowed_frames(frames, 1)
  return 1 + (frames - 1) // temporal_factor * temporal_factor


def make_dataset(config, *, split: str, process_index: int = 0, process_count: int = 1, seed: int = 0,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """This process's fixed-shape batches of `split`: source -> shard -> shuffle -> repeat -> CropClip -> batch.

  The iterator is Grain's (its state is checkpointable); num_epochs None repeats forever.
  """
  data = config.data
  global_batch = int(config.train.global_batch)
  if global_batch % process_count:
    raise ValueError(f"train.global_batch={global_batch} is not divisible by process_count={process_count}")
  model = build_model(config)
  source = sources.open_source(data.name, split, data.data_dir, **pipeline.builder_kwargs(data))
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.random_map(CropClip(frames=int(data.frames), height=int(data.height), width=int(data.width),
                              temporal_factor=model.temporal_factor, spatial=str(data.spatial)),
                     seed=seed)
  min_frames = int(data.min_frames)
  if min_frames <= 1:
    ds = ds.batch(global_batch // process_count, drop_remainder=True)
    return ds.to_iter_dataset(pipeline.read_options(data))
  # Only clips of >= min_frames usable frames: e.g. every crop as long as data.frames, so the
  # causal decoder learns each latent frame's full temporal context, none of the step on padding.
  ds = ds.to_iter_dataset(pipeline.read_options(data)).filter(lambda example: int(example["frame_mask"].sum()) >= min_frames)
  return ds.batch(global_batch // process_count, drop_remainder=True)
