"""The VAE family (models/vae.py), its task (train/vae_task.py) and metrics.psnr/ssim, at smoke sizes."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from diffusion_jax import config as config_lib
from diffusion_jax import inference
from diffusion_jax import metrics
from diffusion_jax.models import vae
from diffusion_jax.train import loop, vae_task

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "vae_video.py")


@pytest.fixture(scope="module")
def smoke():
  """The smoke video VAE (x4 space, x4 time), its params, and a 9-frame 16 px clip batch."""
  model = vae.build_vae({"variant": "smoke"})
  video = jax.random.uniform(jax.random.PRNGKey(0), (2, 9, 16, 16, 3), minval=-1.0, maxval=1.0)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), video[:, :1])["params"])
  return model, params, video


def _encode(model, params, video):
  return model.apply({"params": params}, video, method=vae.VideoVAE.encode)


def test_shapes_of_every_family(smoke):
  model, params, video = smoke
  mean, logvar = _encode(model, params, video)
  assert mean.shape == logvar.shape == (2, 3, 4, 4, 4)  # 1 + 4k frames -> 1 + k latents
  assert model.apply({"params": params}, mean, method=vae.VideoVAE.decode).shape == video.shape
  with pytest.raises(ValueError, match="1 \\+ 4k frames, got T=8"):
    _encode(model, params, video[:, :8])
  # Shapes only (no compute) for the big ones: x8 space, 4 / 16 channels, 2D image variant keeps T.
  for variant, frames, expected in (("sd", 3, (1, 3, 4, 4, 4)), ("video16", 5, (1, 2, 4, 4, 16)),
                                    ("small_image", 2, (1, 2, 8, 8, 4))):
    big = vae.build_vae({"variant": variant})
    x = jax.ShapeDtypeStruct((1, frames, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda v, m=big: m.init_with_output(jax.random.PRNGKey(0), v)[0], x)
    recon, mean, _ = shapes
    assert mean.shape == expected and recon.shape == (1, frames, 32, 32, 3), variant
  auto = vae.build_vae({"variant": "smoke", "variational": False})
  auto_params = auto.init(jax.random.PRNGKey(0), video[:, :1])["params"]
  mean, logvar = _encode(auto, auto_params, video)
  assert mean.shape == (2, 3, 4, 4, 4) and np.all(np.asarray(logvar) == vae.LOGVAR_MIN)


@pytest.mark.parametrize("kernel,strides", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 2, 2)), ((3, 3, 3), (1, 2, 2)),
                                            ((1, 3, 3), (1, 1, 1)), ((2, 1, 1), (1, 1, 1))])
def test_time_folded_conv_equals_the_3d_conv(kernel, strides):
  """The CPU path of causal_conv (one 2D convolution over stacked frames) is the 3D convolution."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 10, 9, 3)), jnp.float32)  # frames incl. the causal padding
  k = jnp.asarray(rng.normal(size=kernel + (3, 5)), jnp.float32)
  pads = [vae._same_pads(10, kernel[1], strides[1]), vae._same_pads(9, kernel[2], strides[2])]
  want = jax.lax.conv_general_dilated(x, k, strides, [(0, 0)] + pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  got = vae._time_folded_conv(x, k, strides, pads)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("time_padding", vae.TIME_PADDINGS)
def test_encoder_and_decoder_are_causal(smoke, time_padding):
  _, params, video = smoke
  model = vae.build_vae({"variant": "smoke", "time_padding": time_padding})
  mean, _ = _encode(model, params, video)
  changed, _ = _encode(model, params, video.at[:, 5].set(0.5))  # frame 5 is coded by latent frame 2
  np.testing.assert_array_equal(np.asarray(changed[:, :2]), np.asarray(mean[:, :2]))
  assert np.abs(np.asarray(changed[:, 2] - mean[:, 2])).max() > 1e-3

  recon = model.apply({"params": params}, mean, method=vae.VideoVAE.decode)
  recon2 = model.apply({"params": params}, mean.at[:, 1].add(1.0), method=vae.VideoVAE.decode)  # frames 1-4
  np.testing.assert_array_equal(np.asarray(recon2[:, 0]), np.asarray(recon[:, 0]))
  per_frame = np.abs(np.asarray(recon2 - recon)).max(axis=(0, 2, 3, 4))
  assert np.all(per_frame[1:5] > 1e-3), per_frame


def test_image_is_a_one_frame_video_and_a_masked_frame_zero(smoke):
  model, params, video = smoke
  image_mean, _ = _encode(model, params, video[:, :1])
  clip_mean, _ = _encode(model, params, video)
  np.testing.assert_allclose(np.asarray(image_mean[:, 0]), np.asarray(clip_mean[:, 0]), atol=1e-5)
  # The data path's masked example: the image at frame 0, zero padding after it.
  padded = jnp.zeros_like(video).at[:, :1].set(video[:, :1])
  image_recon, _, _ = model.apply({"params": params}, video[:, :1])
  padded_recon, padded_mean, _ = model.apply({"params": params}, padded)
  np.testing.assert_allclose(np.asarray(padded_mean[:, 0]), np.asarray(image_mean[:, 0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(padded_recon[:, 0]), np.asarray(image_recon[:, 0]), atol=1e-5)


def test_replicate_padding_sees_the_first_frame_before_the_clip():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 2, 1))
  kernel = jnp.zeros((3, 1, 1, 1, 1)).at[0].set(1.0)  # output t = input t - 2
  replicate = vae.causal_conv(x, kernel, jnp.zeros(1), time_padding="replicate")
  np.testing.assert_allclose(np.asarray(replicate[:, :3]), np.asarray(jnp.repeat(x[:, :1], 3, axis=1)))
  np.testing.assert_array_equal(np.asarray(vae.causal_conv(x, kernel, jnp.zeros(1))[:, :2]), 0.0)
  with pytest.raises(ValueError, match="time_padding"):
    vae.build_vae({"variant": "smoke", "time_padding": "reflect"})


def test_kl_matches_monte_carlo():
  mean = np.array([0.5, -1.0, 2.0], np.float32)
  logvar = np.array([0.3, -1.2, 0.0], np.float32)
  kl = float(jnp.sum(vae.kl_to_standard_normal(mean, logvar)))
  z = np.asarray(vae.sample(jnp.broadcast_to(mean, (200_000, 3)), jnp.broadcast_to(logvar, (200_000, 3)),
                            jax.random.PRNGKey(0)), np.float64)
  var = np.exp(logvar.astype(np.float64))
  log_q = -0.5 * np.sum((z - mean) ** 2 / var + logvar + np.log(2 * np.pi), axis=1)
  log_p = -0.5 * np.sum(z ** 2 + np.log(2 * np.pi), axis=1)
  assert abs(np.mean(log_q - log_p) - kl) < 0.02 * kl
  assert abs(kl - 0.5 * (np.sum(var + mean ** 2 - 1 - logvar))) < 1e-5
  np.testing.assert_allclose(vae.kl_to_standard_normal(np.zeros(2), np.zeros(2)), 0.0)


def test_chunked_decode_equals_full_decode(smoke):
  model, params, video = smoke
  z = jax.random.normal(jax.random.PRNGKey(3), (1, 4, 4, 4, 4))  # 4 latent frames -> 13 frames
  full = np.asarray(model.apply({"params": params}, z, method=vae.VideoVAE.decode))
  assert full.shape == (1, 13, 16, 16, 3)
  for chunk in (1, 3, 8):  # 3: a shorter last chunk, 8: longer than the clip (both zero-padded)
    np.testing.assert_allclose(np.asarray(vae.decode_chunked(model, params, z, chunk)), full, atol=1e-5)
  # The first chunk pads with the clip's first frames, later ones with the cache, as a whole decode.
  replicate = vae.build_vae({"variant": "smoke", "time_padding": "replicate"})
  full_replicate = np.asarray(replicate.apply({"params": params}, z, method=vae.VideoVAE.decode))
  assert np.abs(full_replicate - full).max() > 1e-3
  for chunk in (1, 3):
    np.testing.assert_allclose(np.asarray(vae.decode_chunked(replicate, params, z, chunk)), full_replicate,
                               atol=1e-5)
  image_model = vae.build_vae({"variant": "smoke_image"})  # 2D: no caches, one frame per latent frame
  image_params = nn.meta.unbox(image_model.init(jax.random.PRNGKey(1), video[:, :1])["params"])
  full = np.asarray(image_model.apply({"params": image_params}, z, method=vae.VideoVAE.decode))
  assert full.shape == (1, 4, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(vae.decode_chunked(image_model, image_params, z, 3)), full, atol=1e-5)


def test_psnr_and_ssim_known_values():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (2, 20, 18, 3)).astype(np.float32)
  assert np.all(np.isinf(metrics.psnr(a, a))) and np.allclose(metrics.ssim(a, a), 1.0)
  b = a + 0.1 * np.where(rng.random(a.shape) < 0.5, -1.0, 1.0).astype(np.float32)  # MSE exactly 0.01
  np.testing.assert_allclose(metrics.psnr(a, b), 10 * np.log10(4 / 0.01), rtol=1e-5)
  np.testing.assert_allclose(metrics.psnr(a * 127.5, b * 127.5, data_range=255.0), 10 * np.log10(4 / 0.01),
                             rtol=1e-5)
  expected = [structural_similarity(a[i], b[i], data_range=2.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False) for i in range(2)]
  np.testing.assert_allclose(metrics.ssim(a, b), expected, atol=1e-5)


def test_clip_crop_trims_to_1_plus_4k_and_masks():
  frames = np.arange(1, 12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 16, 16, 3), np.uint8)  # 11
  crop = vae_task.CropClip(frames=9, height=16, width=16, spatial="crop")
  out = crop.random_map({"video": frames[:7], "id": np.int64(4)}, np.random.default_rng(0))
  assert out["video"].shape == (9, 16, 16, 3) and out["example_ids"] == 4
  np.testing.assert_array_equal(out["frame_mask"], [True] * 5 + [False] * 4)  # 7 frames -> the first 5
  np.testing.assert_array_equal(out["video"][:, 0, 0, 0], [1, 2, 3, 4, 5, 0, 0, 0, 0])
  image = crop.random_map({"video": frames[0, :, :, :], "id": np.int64(0)}, np.random.default_rng(0))
  np.testing.assert_array_equal(image["frame_mask"], [True] + [False] * 8)
  # 11 frames -> the first 9; a 5-frame crop starts anywhere in them, never reaching frames 10-11.
  short = vae_task.CropClip(frames=5, height=8, width=8, spatial="crop")
  starts = {int(short.random_map({"video": frames, "id": 0}, np.random.default_rng(s))["video"][0, 0, 0, 0])
            for s in range(40)}
  assert starts == {1, 2, 3, 4, 5}
  assert [vae_task.trimmed_frames(t) for t in (1, 4, 5, 8, 9, 16, 17)] == [1, 1, 5, 5, 9, 13, 17]


def test_gan_updates_each_net_with_its_own_term(smoke):
  config = config_lib.load_config(CONFIG + ":smoke,gan")
  model = vae_task.build_model(config)
  params = vae_task.init_params(model, config, jax.random.PRNGKey(0))
  params = nn.meta.unbox(params)
  batch = {"video": np.asarray((smoke[2][:, :5] + 1) * 127.5, np.uint8), "frame_mask": np.ones((2, 5), bool)}

  def grads_with(weight):
    """A jitted gradient at gan_weight=weight (read from the config when it is traced, i.e. now)."""
    with config.unlocked():
      config.loss.gan_weight = weight
    grad = jax.jit(jax.grad(lambda p, step: vae_task.loss_fn(p, model, None, batch, jax.random.PRNGKey(1), config,
                                                             step=step)[0]))
    grad.lower(params, jnp.int32(0))  # trace at this weight
    return grad

  half, double = grads_with(0.5), grads_with(2.0)
  a, b, off = half(params, jnp.int32(5)), double(params, jnp.int32(5)), double(params, jnp.int32(0))  # gan_start=2
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
  np.testing.assert_allclose(flat(a["disc"]), flat(b["disc"]), atol=1e-6)  # the G term never moves D
  assert np.abs(flat(a["vae"]) - flat(b["vae"])).max() > 1e-6  # ... it moves the VAE
  assert np.abs(flat(a["disc"])).max() > 0 and np.abs(flat(off["disc"])).max() == 0  # D trains from gan_start


def test_training_improves_and_saves_latent_stats(smoke_vae):
  config, workdir = smoke_vae  # the smoke VAE trained 30 steps at lr 3e-3 (conftest.py)
  handle = inference.load_vae(workdir)
  assert (handle.spatial_factor, handle.temporal_factor, handle.latent_channels) == (4, 4, 4)
  assert handle.config_hash == config_lib.config_hash(config) and handle.step == 30
  with open(os.path.join(workdir, "checkpoints", "30", "extras", "metadata")) as f:
    saved = json.load(f)["latent_stats"]
  assert handle.latent_stats == {"mean": saved["mean"], "std": saved["std"]}

  # The stats are those of the saved EMA params over the fixed eval set, recomputed here.
  eval_iter = iter(vae_task.make_dataset(config, split="validation", seed=config.data.shuffle_seed))
  batches = [next(eval_iter) for _ in range(2)]
  means, variances, initial_l1, trained_l1 = [], [], [], []
  init = nn.meta.unbox(vae_task.init_params(handle.model, config, jax.random.PRNGKey(7)))["vae"]
  apply = jax.jit(handle.model.apply)
  for batch in batches:
    video = batch["video"].astype(np.float32) / 127.5 - 1.0
    mean, logvar = handle.encode(video)
    lmask = batch["frame_mask"][:, ::4]
    means.append(mean[lmask].reshape(-1, 4))
    variances.append(np.exp(logvar[lmask]).reshape(-1, 4))
    real = batch["frame_mask"]
    trained_l1.append(np.abs(handle.decode(mean)[real] - video[real]).mean())
    recon, _, _ = apply({"params": init}, video)
    initial_l1.append(np.abs(np.asarray(recon)[real] - video[real]).mean())
  means, variances = np.concatenate(means), np.concatenate(variances)
  np.testing.assert_allclose(handle.latent_stats["mean"], means.mean(0), atol=1e-4)
  # The std of posterior samples: Var(mean) + E[exp(logvar)].
  np.testing.assert_allclose(handle.latent_stats["std"], np.sqrt(means.var(0) + variances.mean(0)), atol=1e-4)
  assert np.mean(trained_l1) < 0.7 * np.mean(initial_l1), (trained_l1, initial_l1)


def test_min_frames_keeps_only_clips_that_long(smoke_vae):
  config, _ = smoke_vae  # smoke data: clips of 1, 5 and 6 frames, crops of data.frames = 5
  config = config_lib.from_json(config_lib.to_json(config))  # a copy: the fixture is shared
  masks = {}
  for min_frames in (1, 5):
    config.data.min_frames = min_frames
    batches = iter(vae_task.make_dataset(config, split="train", seed=0))
    masks[min_frames] = np.concatenate([next(batches)["frame_mask"] for _ in range(6)])
  assert not masks[1].all() and masks[1][:, 0].all()  # images and short clips sit at frame 0, padded
  assert masks[5].all()  # only clips with all 5 frames
  for bad in (0, 6):
    config.data.min_frames = bad
    with pytest.raises(config_lib.ConfigError, match="data.min_frames"):
      vae_task.validate(config)
