"""Trained models ready for inference: a VAE, a generator (the DiT or U-Net a sampler runs) and the
digit classifier, each read from a training workdir or an export.

Their params all come through export.restore_ema_params (an export's own
VAE through export.load_export), which reads the EMA params alone; the
training tasks in train/ only define and train the models.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import export as export_lib
from diffusion_jax import paths
from diffusion_jax import sharding
from diffusion_jax.models import text
from diffusion_jax.models import vae as vae_lib
from diffusion_jax.train import captioner_task, classifier_task, dit_task, vae_task


# --------------------------------------------------------------------------- VAE

class VaeHandle:
  """A trained VAE ready to encode and decode, as the encode step and latent diffusion use it.

  encode(video float32 [B, T, H, W, C] in [-1, 1]) -> (mean, logvar) numpy [B, 1 + (T-1)//4, H/f, W/f, z]
  decode(z [B, T', h, w, z]) -> numpy video [B, 1 + 4(T'-1), h*f, w*f, C] in about [-1, 1] (chunked)
  spatial_factor, temporal_factor, latent_channels, latent_stats {"mean": [...], "std": [...]},
  config_hash (config.config_hash of the training config), config, step.
  """

  def __init__(self, config, params, latent_stats, *, step=None, path=""):
    self.config = config
    self.model = vae_task.build_model(config)
    self.params = params
    self.latent_stats = latent_stats
    self.step = step
    self.path = path
    self.config_hash = config_lib.config_hash(config)
    self.spatial_factor = self.model.spatial_factor
    self.temporal_factor = self.model.temporal_factor
    self.latent_channels = self.model.latent_channels
    self._encode = jax.jit(lambda p, v: self.model.apply({"params": p}, v, method=vae_lib.VideoVAE.encode))

  def encode(self, video):
    video = np.asarray(video, np.float32)
    mean, logvar = self._encode(self.params, video)
    return np.asarray(mean), np.asarray(logvar)

  def decode(self, z, chunk_frames: int = 4):
    return np.asarray(vae_lib.decode_chunked(self.model, self.params, jnp.asarray(z, jnp.float32), chunk_frames))


def load_vae(path: str, step: int | None = None) -> VaeHandle:
  """The VAE of a training workdir (newest step or `step`; EMA params; the saved config and latent
  stats), or of an export directory (one holding export.json), on the first local device."""
  path = paths.absolute(path)
  if paths.isfile(paths.join(path, export_lib.INFO_FILE)):
    exported = export_lib.load_export(path)
    stats = exported.info.get("latent_stats")
    if stats is None and paths.isfile(paths.join(path, "latent_stats.json")):
      stats = json.loads(paths.read_text(paths.join(path, "latent_stats.json")))
    return VaeHandle(exported.config, exported.params["vae"], stats, step=exported.info.get("step"), path=path)
  if not paths.isdir(paths.join(path, "checkpoints")):
    raise ValueError(f"{path} is neither a VAE export (no export.json) nor a training workdir (no checkpoints/)")
  config, step, params = export_lib.restore_ema_params(path, step)
  if config.task != "vae":
    raise ValueError(f"{path} holds a checkpoint of task {config.task!r}, not a VAE")
  stats = (export_lib.saved_extras(path, step) or {}).get("latent_stats")
  if stats is None:
    raise ValueError(f"{path} step {step} has no latent statistics saved with it (a checkpoint from before "
                     "checkpoint_extras); resave it with this code")
  stats = {"mean": list(stats["mean"]), "std": list(stats["std"])}
  return VaeHandle(config, params["vae"], stats, step=step, path=path)


# --------------------------------------------------------------------------- generator

@dataclasses.dataclass
class Generator:
  """What sampling needs: config, backbone and EMA params, and the optional VAE and text encoder."""
  config: object
  model: object
  params: object
  vae: object = None  # a VaeHandle for latent models
  text_encoder: object = None
  step: int = -1

  @property
  def spatial_factor(self) -> int:
    return self.vae.spatial_factor if self.vae is not None else 1

  @property
  def temporal_factor(self) -> int:
    return self.vae.temporal_factor if self.vae is not None else 1

  @property
  def pixel_channels(self) -> int:
    return 3 if self.vae is not None else int(self.config.data.channels)


def load_generator(workdir: str) -> Generator:
  """The newest checkpoint of a training workdir (EMA params replicated over every device, which
  sampling splits rows over: sharding.data_mesh), its VAE and its text encoder."""
  config, step, params = export_lib.restore_ema_params(workdir, mesh_for=lambda c: sharding.data_mesh(c.mesh))
  return with_conditioners(config, dit_task.build_model(config), params, step)


def with_conditioners(config, model, params, step: int = -1) -> Generator:
  """A Generator with the config's VAE (latent.vae) and text encoder (text.encoder_dir) loaded."""
  vae = encoder = None
  latent = config.get("latent", None)
  if latent is not None and latent.get("vae", ""):
    vae = load_vae(latent.vae)
  if dit_task.uses_text(config):
    encoder = text.load_text_encoder(config.get("text", {}).get("encoder_dir", ""))
  return Generator(config, model, params, vae, encoder, step)


# --------------------------------------------------------------------------- classifier

@functools.lru_cache(maxsize=8)
def _jitted_apply(config_json: str):
  model = classifier_task.build_model(config_lib.from_json(config_json))
  return jax.jit(lambda params, frames: model.apply({"params": params}, frames))


def classify(export, frames, *, batch_size: int = 256):
  """(logits [N, num_classes], features [N, D]) as float32 numpy, for uint8 frames [N, H, W, 3].

  `export` is an export.load_export(...) of a classifier run (task
  "classifier"). Frames of any size are resized inside the network. Runs in
  fixed-size chunks (the last one padded) so any N compiles once per frame size.
  """
  if export.config.task != "classifier":
    raise ValueError(f"classify needs an export of task 'classifier', got task {export.config.task!r} "
                     f"({export.path})")
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"classify wants uint8 frames [N, H, W, 3], got {frames.dtype} {frames.shape}")
  apply = _jitted_apply(config_lib.to_json(export.config))
  chunk = min(batch_size, max(len(frames), 1))
  logits, features = [], []
  for start in range(0, len(frames), chunk):
    part = frames[start:start + chunk]
    padded = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], np.uint8)])
    out_logits, out_features = jax.device_get(apply(export.params, padded))
    logits.append(out_logits[:len(part)])
    features.append(out_features[:len(part)])
  if not logits:
    return np.zeros((0, int(export.config.model.num_classes)), np.float32), np.zeros((0, 0), np.float32)
  return np.concatenate(logits), np.concatenate(features)


def load_captioner(path: str, step: int | None = None) -> captioner_task.LoadedCaptioner:
  """The captioner of a training workdir or an export (its EMA params, export.restore_ema_params)."""
  config, step, params = export_lib.restore_ema_params(path, step)
  return captioner_task.LoadedCaptioner(config, params, step)
