"""Autoencoders of images and videos: AE, VAE and the causal 3D video VAE, one family.

The architecture follows the Stable Diffusion / LDM autoencoder (Rombach et
al. 2022: ResNet blocks with GroupNorm and SiLU, a stride-2 convolution per
down level, nearest upsampling + convolution per up level, a diagonal
Gaussian posterior whose log-variance is clipped to [-30, 20]) made causal in
time as video VAEs (MAGVIT-v2, CogVideoX, Open-Sora) do:

- Every convolution is a `CausalConv3d`: the time axis is padded on the past
  side only (with zeros), so output frame t sees input frames <= t.
- Time is down-sampled x2 by a causal convolution of temporal kernel 3 and
  stride 2: output frame 0 sees only input frame 0 (the padding), output
  frame j sees input frames 2j-2..2j. Twice, so a (1 + 4k)-frame clip maps to
  1 + k latent frames and the first frame is encoded on its own: an image is
  a one-frame video and encodes to the same latent as frame 0 of any clip.
- The decoder up-samples time x2 by depth-to-time (a convolution to 2C
  channels, each frame split into two), dropping the first output frame of
  the clip's first latent frame: 1 + k -> 1 + 2k -> 1 + 4k frames.
- GroupNorm normalises each frame on its own (over H, W and the group's
  channels), never across time, which would leak the future into the past.
- No attention in the mid block (SD has one): without it the decoder is
  convolutional and causal end to end, so it decodes in chunks of latent
  frames with small caches (`decode_chunked`), peak memory independent of
  the clip's duration.

Layout: video [B, T, H, W, C] float in [-1, 1]; latents [B, 1 + (T-1)//4,
H/f, W/f, z] (f = 2 ** (len(widths) - 1)). The 2D image variants
(`temporal=False`) use temporal kernel 1 and no temporal down-sampling: each
frame is coded alone and T latent frames come out of T frames.

`variational=False` is the deterministic autoencoder: the encoder outputs the
mean only and `logvar` is the constant LOGVAR_MIN (a point mass), so
sampling returns the mean; train it with kl_weight = 0.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's DiagonalGaussianDistribution clamp

# Logical axis names of the params (mesh rules in the config map them).
KERNEL_AXES = ("kernel_t", "kernel_h", "kernel_w", "channels_in", "channels")
VIDEO_AXES = ("batch", None, None, None, None)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding: ceil(size / stride) outputs."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


MIN_GROUP_CHANNELS = 4  # FrameGroupNorm never normalises fewer channels together

# causal_conv's implementation, read at trace time: "auto" (_time_folded_conv on CPU, the 3D
# convolution elsewhere), "folded" or "3d" (benchmarks/vae.py compares them).
CONV_IMPL = "auto"


TIME_PADDINGS = ("zeros", "replicate")


def clip_start(x, frames: int, time_padding: str):
  """The `frames` frames a causal convolution puts before a clip's first: zeros, or the first
  frame repeated ("replicate": the earliest kernel taps then see real content at the clip's
  start too, as they do everywhere later; with zeros, a VAE trained on short clips never trains
  them on real frames at the latent rate, and its later latent frames come back wrong)."""
  if time_padding == "replicate":
    return jnp.repeat(x[:, :1], frames, axis=1)
  if time_padding != "zeros":
    raise ValueError(f"unknown time_padding {time_padding!r}; valid: {TIME_PADDINGS}")
  return jnp.zeros((x.shape[0], frames) + x.shape[2:], x.dtype)


def causal_conv(x, kernel, bias, strides=(1, 1, 1), past=None, time_padding: str = "zeros"):
  """Convolution of x [B, T, H, W, Cin] with kernel [kt, kh, kw, Cin, Cout], causal in time.

  The time axis is prefixed with `past` ([B, kt-1, H, W, Cin], the previous
  chunk's last input frames) or, at the start of a clip, kt-1 frames of
  clip_start(time_padding); H and W are padded 'SAME'. Output frame t sees
  input frames <= t * stride.
  """
  kt, kh, kw = kernel.shape[:3]
  if kt > 1:
    if past is None:
      past = clip_start(x, kt - 1, time_padding)
    x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
  spatial_pads = [_same_pads(x.shape[2], kh, strides[1]), _same_pads(x.shape[3], kw, strides[2])]
  kernel = kernel.astype(x.dtype)
  if CONV_IMPL == "folded" or (CONV_IMPL == "auto" and jax.default_backend() == "cpu"):
    y = _time_folded_conv(x, kernel, strides, spatial_pads)
  else:
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=tuple(strides), padding=[(0, 0)] + spatial_pads,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return y + bias.astype(y.dtype)


def _time_folded_conv(x, kernel, strides, spatial_pads):
  """The valid-in-time 3D convolution of causal_conv as ONE 2D convolution: the kt frames each
  output frame sees are stacked on the channel axis, [B T', H, W, kt Cin], against the kernel
  reshaped to [kh, kw, kt Cin, Cout]. The same sums; XLA's CPU 3D convolution is 4-8x slower
  than its 2D one at the VAE's widths (fwd+bwd, 2-core CPU), so CPUs take this path. It holds
  kt copies of the input, so accelerators, whose 3D convolutions are fast, keep the direct one."""
  kt, kh, kw, cin, cout = kernel.shape
  batch, frames = x.shape[:2]
  st = strides[0]
  out_frames = (frames - kt) // st + 1
  stacked = jnp.concatenate([x[:, i:i + st * (out_frames - 1) + 1:st] for i in range(kt)], axis=-1)
  stacked = stacked.reshape((batch * out_frames,) + stacked.shape[2:])
  folded = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout)
  y = jax.lax.conv_general_dilated(stacked, folded, window_strides=tuple(strides[1:]), padding=spatial_pads,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape((batch, out_frames) + y.shape[1:])


class CausalConv3d(nn.Module):
  """A causal 3D convolution (see causal_conv) with a chunked-decoding cache.

  When the "cache" collection is mutable (decode_chunked), the last kt-1
  input frames are kept in cache/past and prefixed to the next call's input
  instead of the clip-start padding, so decoding a clip chunk by chunk equals
  decoding it whole.
  """

  features: int
  kernel: tuple = (3, 3, 3)
  strides: tuple = (1, 1, 1)
  dtype: jnp.dtype = jnp.float32
  time_padding: str = "zeros"  # clip_start's rule

  @nn.compact
  def __call__(self, x):
    kt = self.kernel[0]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), KERNEL_AXES),
        tuple(self.kernel) + (x.shape[-1], self.features))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)),
                      (self.features,))
    x = x.astype(self.dtype)
    past = None
    if kt > 1 and self.is_mutable_collection("cache") and not self.is_initializing():
      if self.strides[0] != 1:
        raise ValueError("chunked (cached) decoding supports temporal stride 1 only")
      started = self.has_variable("cache", "past")  # no cache yet: this chunk starts the clip
      cached = self.variable("cache", "past", jnp.zeros, (x.shape[0], kt - 1) + x.shape[2:], x.dtype)
      past = cached.value if started else clip_start(x, kt - 1, self.time_padding)
      cached.value = jnp.concatenate([past, x], axis=1)[:, -(kt - 1):]
    return causal_conv(x, kernel, bias, self.strides, past, self.time_padding)


class FrameGroupNorm(nn.Module):
  """GroupNorm of each frame alone: statistics over (H, W, channels of a group), never over time.

  Groups keep at least MIN_GROUP_CHANNELS channels (SD's 32 groups of >= 4 at
  128+ channels). A group of ONE channel is instance norm: it removes each
  channel's spatial mean, so before the output convolution no absolute colour
  is left and narrow VAEs decode every background to one average colour."""

  groups: int = 32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = max(1, min(self.groups, c // MIN_GROUP_CHANNELS))
    while c % groups:
      groups -= 1
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("channels",)), (c,))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)), (c,))
    dtype = x.dtype
    h = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
    mean = h.mean(axis=(2, 3, 5), keepdims=True)
    var = jnp.square(h - mean).mean(axis=(2, 3, 5), keepdims=True)
    h = ((h - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (h * scale + bias).astype(dtype)


class ResBlock(nn.Module):
  """norm -> SiLU -> conv -> norm -> SiLU -> conv, plus the (1x1x1-projected) input."""

  features: int
  kernel: tuple
  dtype: jnp.dtype = jnp.float32
  time_padding: str = "zeros"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(CausalConv3d, dtype=self.dtype, time_padding=self.time_padding)
    h = conv(self.features, self.kernel, name="conv1")(nn.silu(FrameGroupNorm(name="norm1")(x)))
    h = conv(self.features, self.kernel, name="conv2")(nn.silu(FrameGroupNorm(name="norm2")(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, (1, 1, 1), name="skip")(x)
    return x + h


def _temporal_stages(levels: int, temporal_downs: int) -> tuple:
  """Indices of the down-sampling stages that also halve time: the last `temporal_downs` of them."""
  stages = levels - 1
  return tuple(range(stages - temporal_downs, stages))


class Encoder(nn.Module):
  widths: tuple
  num_res_blocks: int
  out_channels: int
  temporal_downs: int
  kernel: tuple
  dtype: jnp.dtype = jnp.float32
  time_padding: str = "zeros"

  @nn.compact
  def __call__(self, x):
    temporal = _temporal_stages(len(self.widths), self.temporal_downs)
    conv = functools.partial(CausalConv3d, dtype=self.dtype, time_padding=self.time_padding)
    block = functools.partial(ResBlock, kernel=self.kernel, dtype=self.dtype, time_padding=self.time_padding)
    x = conv(self.widths[0], self.kernel, name="conv_in")(x)
    for level, width in enumerate(self.widths):
      for i in range(self.num_res_blocks):
        x = block(width, name=f"down_{level}_block_{i}")(x)
      if level < len(self.widths) - 1:
        stride_t = 2 if level in temporal else 1
        x = conv(width, self.kernel, (stride_t, 2, 2), name=f"down_{level}_sample")(x)
    x = block(self.widths[-1], name="mid_block")(x)
    x = nn.silu(FrameGroupNorm(name="norm_out")(x))
    return conv(self.out_channels, self.kernel, name="conv_out")(x)


class Decoder(nn.Module):
  """Mirror of the Encoder. `first`: this call holds the clip's first latent frame
  (its temporal up-sampling drops one frame); False for the later chunks."""

  widths: tuple
  num_res_blocks: int
  out_channels: int
  temporal_downs: int
  kernel: tuple
  dtype: jnp.dtype = jnp.float32
  time_padding: str = "zeros"

  @nn.compact
  def __call__(self, z, first: bool = True, features_only: bool = False):
    temporal = _temporal_stages(len(self.widths), self.temporal_downs)
    conv = functools.partial(CausalConv3d, dtype=self.dtype, time_padding=self.time_padding)
    block = functools.partial(ResBlock, kernel=self.kernel, dtype=self.dtype, time_padding=self.time_padding)
    x = conv(self.widths[-1], self.kernel, name="conv_in")(z)
    x = block(self.widths[-1], name="mid_block")(x)
    for level in reversed(range(len(self.widths))):
      width = self.widths[level]
      for i in range(self.num_res_blocks + 1):
        x = block(width, name=f"up_{level}_block_{i}")(x)
      if level > 0:
        if level - 1 in temporal:  # depth-to-time: each frame becomes two
          b, t, h, w, c = x.shape
          x = conv(2 * c, self.kernel, name=f"up_{level}_time")(x)
          x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
          if first:
            x = x[:, 1:]  # the first latent frame stands for one frame, not two
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        x = conv(self.widths[level - 1], self.kernel, name=f"up_{level}_sample")(x)
    x = nn.silu(FrameGroupNorm(name="norm_out")(x))
    if features_only:
      return x
    return conv(self.out_channels, self.kernel, name="conv_out")(x)


class VideoVAE(nn.Module):
  """Encoder + diagonal Gaussian posterior + decoder (see the module docstring).

  widths: channels per level; len(widths) - 1 spatial x2 down-samplings.
  temporal: causal 3D (kernel 3 in time, `temporal_downs` x2 time
  down-samplings, the last ones) or 2D per frame (kernel 1, no time change).
  variational: VAE (mean and log-variance) or deterministic autoencoder.
  time_padding: what the causal convolutions put before a clip's first frame (clip_start).
  """

  widths: tuple = (32, 64, 64)
  num_res_blocks: int = 1
  latent_channels: int = 4
  in_channels: int = 3
  temporal: bool = True
  temporal_downs: int = 2
  variational: bool = True
  time_padding: str = "zeros"
  dtype: jnp.dtype = jnp.float32

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.widths) - 1)

  @property
  def temporal_factor(self) -> int:
    return 2 ** self.temporal_downs if self.temporal else 1

  def _kernel(self):
    return (3, 3, 3) if self.temporal else (1, 3, 3)

  def setup(self):
    downs = self.temporal_downs if self.temporal else 0
    out = 2 * self.latent_channels if self.variational else self.latent_channels
    self.encoder = Encoder(tuple(self.widths), self.num_res_blocks, out, downs, self._kernel(), self.dtype,
                           self.time_padding)
    self.decoder = Decoder(tuple(self.widths), self.num_res_blocks, self.in_channels, downs, self._kernel(),
                           self.dtype, self.time_padding)

  def latent_frames(self, frames: int) -> int:
    return 1 + (frames - 1) // self.temporal_factor

  def _check_video(self, video):
    if video.ndim != 5 or video.shape[-1] != self.in_channels:
      raise ValueError(f"the VAE wants video [B, T, H, W, {self.in_channels}], got shape {tuple(video.shape)}")
    t, h, w = video.shape[1:4]
    if (t - 1) % self.temporal_factor:
      raise ValueError(f"a causal video VAE with temporal factor {self.temporal_factor} takes 1 + "
                       f"{self.temporal_factor}k frames, got T={t}; keep the first "
                       f"1 + {self.temporal_factor}*floor((T-1)/{self.temporal_factor}) frames")
    if h % self.spatial_factor or w % self.spatial_factor:
      raise ValueError(f"frame size {h}x{w} is not divisible by the VAE's spatial factor {self.spatial_factor}")

  def encode(self, video):
    """video [B, T, H, W, C] in [-1, 1] -> (mean, logvar) [B, 1 + (T-1)//4, H/f, W/f, z], float32."""
    self._check_video(video)
    video = nn.with_logical_constraint(video, VIDEO_AXES)
    moments = self.encoder(video.astype(self.dtype)).astype(jnp.float32)
    if not self.variational:
      return moments, jnp.full_like(moments, LOGVAR_MIN)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z, first: bool = True):
    """z [B, T', h, w, z] -> video [B, 1 + 4(T'-1), h*f, w*f, C] (float32; `first` as in Decoder)."""
    z = nn.with_logical_constraint(z, VIDEO_AXES)
    return self.decoder(z.astype(self.dtype), first).astype(jnp.float32)

  def decode_features(self, z):
    """The decoder's activations just before its last convolution (for the GAN's adaptive weight)."""
    return self.decoder(z.astype(self.dtype), True, features_only=True)

  def __call__(self, video, *, sample_posterior: bool = False, rng=None):
    """(recon, mean, logvar); recon decodes a posterior sample (needs rng) or the mean."""
    mean, logvar = self.encode(video)
    z = sample(mean, logvar, rng) if sample_posterior else mean
    return self.decode(z), mean, logvar


def sample(mean, logvar, rng):
  """Reparameterised posterior sample z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)."""
  if rng is None:
    raise ValueError("sampling the posterior needs an rng")
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_to_standard_normal(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) per element: (mean^2 + var - 1 - logvar) / 2."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


# --------------------------------------------------------------------------- chunked decoding

@functools.lru_cache(maxsize=32)
def _chunk_decoders(model: VideoVAE):
  """Jitted (first chunk, later chunk) decode steps of a model: (params, [cache,] z) -> (video, cache)."""
  def first(params, z):
    video, variables = model.apply({"params": params}, z, True, method=VideoVAE.decode, mutable=["cache"])
    return video, variables.get("cache", {})

  def later(params, cache, z):
    video, variables = model.apply({"params": params, "cache": cache}, z, False, method=VideoVAE.decode,
                                   mutable=["cache"])
    return video, variables.get("cache", {})

  return jax.jit(first), jax.jit(later)


def decode_chunked(model: VideoVAE, params, z, chunk_frames: int):
  """Decodes latents z [B, T', h, w, z] `chunk_frames` latent frames at a time; equals model.decode.

  Each causal convolution carries its last kt-1 input frames from one chunk
  to the next (the "cache" collection), so peak memory depends on the chunk,
  not on the clip's duration. A clip's shorter last chunk is zero-padded to
  chunk_frames and its extra frames dropped (the decoder is causal: later
  latents change nothing earlier), so every chunk has one shape and two
  programs compile per latent size (first, later), whatever the duration;
  one latent frame (an image) decodes as it is.
  Returns float32 video [B, 1 + 4(T'-1), H, W, C] as a jax.Array.
  """
  if chunk_frames < 1:
    raise ValueError(f"chunk_frames={chunk_frames} must be >= 1")
  first, later = _chunk_decoders(model)
  frames = z.shape[1]
  if frames > 1:
    z = jnp.pad(z, [(0, 0), (0, -frames % chunk_frames)] + [(0, 0)] * (z.ndim - 2))
  outputs, cache = [], None
  for start in range(0, z.shape[1], chunk_frames):
    part = z[:, start:start + chunk_frames]
    if cache is None:
      video, cache = first(params, part)
    else:
      video, cache = later(params, cache, part)
    outputs.append(video)
  return jnp.concatenate(outputs, axis=1)[:, :1 + model.temporal_factor * (frames - 1)]


# --------------------------------------------------------------------------- variants

VARIANTS = {
    # Tests: seconds on a CPU.
    "smoke": dict(widths=(8, 16, 16), num_res_blocks=1, latent_channels=4, temporal=True),
    "smoke_image": dict(widths=(8, 16, 16), num_res_blocks=1, latent_channels=4, temporal=False),
    # CPU quickstart (x4 spatial): a few GFLOP per step of 4 clips of 5 x 32 x 32.
    "small": dict(widths=(8, 16, 32), num_res_blocks=1, latent_channels=4, temporal=True),
    "small_image": dict(widths=(8, 16, 32), num_res_blocks=1, latent_channels=4, temporal=False),
    "medium": dict(widths=(16, 32, 64), num_res_blocks=1, latent_channels=8, temporal=True),
    # Stable Diffusion's autoencoder widths (x8, 4 latent channels), 2D per frame.
    "sd": dict(widths=(128, 256, 512, 512), num_res_blocks=2, latent_channels=4, temporal=False),
    # Causal video VAEs at SD widths (x8 spatial, x4 time).
    "video4": dict(widths=(128, 256, 512, 512), num_res_blocks=2, latent_channels=4, temporal=True),
    "video8": dict(widths=(128, 256, 512, 512), num_res_blocks=2, latent_channels=8, temporal=True),
    "video16": dict(widths=(128, 256, 512, 512), num_res_blocks=2, latent_channels=16, temporal=True),
}


def build_vae(model_config, *, dtype=jnp.float32) -> VideoVAE:
  """VideoVAE from a config's `model` section: `variant` (a VARIANTS row), `variational`
  (default True), optionally `latent_channels` overriding the variant's, `in_channels` (3),
  `time_padding` (clip_start's rule; "zeros" when absent, as configs saved before it had)."""
  cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  variant = cfg.get("variant")
  if variant not in VARIANTS:
    raise ValueError(f"unknown VAE variant {variant!r}; valid: {sorted(VARIANTS)}")
  row = dict(VARIANTS[variant])
  if cfg.get("latent_channels"):
    row["latent_channels"] = int(cfg["latent_channels"])
  if cfg.get("time_padding", "zeros") not in TIME_PADDINGS:
    raise ValueError(f"unknown VAE time_padding {cfg['time_padding']!r}; valid: {TIME_PADDINGS}")
  return VideoVAE(widths=tuple(row["widths"]), num_res_blocks=int(row["num_res_blocks"]),
                  latent_channels=int(row["latent_channels"]), in_channels=int(cfg.get("in_channels", 3)),
                  temporal=bool(row["temporal"]), temporal_downs=2,
                  variational=bool(cfg.get("variational", True)),
                  time_padding=str(cfg.get("time_padding", "zeros")), dtype=dtype)
