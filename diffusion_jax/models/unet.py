"""DDPM / LDM U-Net (Ho et al. 2020; Rombach et al. 2022) behind the packed-batch interface.

Architecture, as DDPM's diffusion_tf/models/unet.py:
  - timestep embedding: sinusoid of `base_channels` features (DDPM's
    get_timestep_embedding: [sin | cos], frequencies 10000^(-i / (half - 1)))
    -> Dense(4 ch) -> SiLU -> Dense(4 ch); a class embedding (DiT's
    LabelEmbedder table, the last row is the null class for classifier-free
    guidance) is added to it when num_classes > 0;
  - conv_in 3x3; down path of len(channel_mults) levels, each
    `num_res_blocks` residual blocks (+ self-attention where the feature map's
    side is in `attention_resolutions`), then a stride-2 3x3 conv except at the
    last level; every output is kept as a skip;
  - middle: residual block, self-attention, residual block;
  - up path: per level `num_res_blocks + 1` residual blocks on the
    concatenation [h, skip] (+ attention), then nearest x2 + 3x3 conv except at
    the first level;
  - GroupNorm, SiLU, conv_out 3x3.
  Residual block: GroupNorm, SiLU, conv 3x3, + Dense(SiLU(temb)), GroupNorm,
  SiLU, dropout, conv 3x3 (zero init); a 1x1 projection of the input when the
  channel count changes. Self-attention: GroupNorm, 1x1 q, k, v, softmax
  attention over the pixels, zero-initialised 1x1 output, residual.
  Initialisers are DDPM's: variance_scaling(1, fan_avg, uniform), zero biases,
  and (near) zero for the last conv of a residual block, the attention output
  and conv_out (exactly zero here, see ddpm_init), so a fresh network outputs 0.

Text conditioning (LDM): with text_dim > 0, each attention site also gets a
cross-attention layer from the pixels to the row's text tokens (GroupNorm, q
from the pixels, k and v from `text`, multi-head softmax attention, zero-init
output, residual). It is LDM's SpatialTransformer reduced to its
cross-attention (no proj_in, self-attention or feed-forward inside it; the
U-Net's own self-attention precedes it). Text tokens with text_segment_ids 0
are padding and never attended to. Caption dropout for classifier-free
guidance is the DiT's: a dropped row's text tokens all become one learned
null vector `null_text` (layers.drop_captions), with probability
caption_dropout_prob in training and wherever `text_null` says at sampling.

Packed-batch interface (docs/design.md): the U-Net takes the DiT's call signature,
x [B, L, P] packed patches, t [B, L], labels [B, K], segment_ids, positions.
A convolutional net needs a fixed grid, so each row must hold exactly ONE
example that fills it: segment_ids all 1, L = T' H' W' of `grid`, tokens in
patches.patchify's (t, h, w) order. Values cannot be checked at trace time;
dit_task.validate enforces examples_per_row == 1 and tokens_per_row == the
grid's tokens, which the packer then guarantees. The row is unpatchified to a
video [T' pt, H' ph, W' pw, C], every frame runs through the U-Net as an image
(images: one frame) with the row's t[:, 0] and labels[:, 0], and the output is
patchified back. `positions` is unused (the grid is implicit in the layout).

Output: [B, L, P_out] float32 with P_out = 2P when learn_sigma, laid out as
the DiT's: out[..., :P] the prediction, out[..., P:] the variance values, each
in (pt, ph, pw, C) order.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import patches
from diffusion_jax.models import layers

Dtype = Any

# Logical axis names of the U-Net's parameters (configs/ddpm_digits.py maps each
# one to mesh axes). 'channels' is a feature map's output channels, 'channels_in'
# a contraction over input channels; 'patch' (pixel channels of conv_in's input
# and conv_out's output, too few to split), 'embed' and 'mlp' (time embedding),
# 'classes' and 'context' (text features) complete the set.
LOGICAL_NAMES = frozenset({"channels", "channels_in", "patch", "embed", "mlp", "classes", "context"})


def ddpm_init(scale=1.0):
  """DDPM's default_init: variance_scaling(scale, fan_avg, uniform).

  DDPM turns scale 0 into 1e-10 (zero up to rounding); here scale 0 is exactly
  zero, as guided-diffusion's zero_module, which also spares a random draw
  (CPU compile time of the init grows with their number)."""
  if scale == 0:
    return layers.zeros
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def timestep_embedding(t, dim):
  """DDPM's get_timestep_embedding: [N] -> [N, dim] = [sin(t f) | cos(t f)],
  f_i = 10000^(-i / (dim/2 - 1)); an odd dim is padded with one zero."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = t.astype(jnp.float32)[:, None] * freqs
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _conv(features, kernel, names, dtype, param_dtype, name, *, strides=1, scale=1.0):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME", dtype=dtype,
                 param_dtype=param_dtype,
                 kernel_init=nn.with_logical_partitioning(ddpm_init(scale), (None, None) + tuple(names)),
                 bias_init=nn.with_logical_partitioning(layers.zeros, (names[1],)), name=name)


def _dense(features, names, dtype, param_dtype, name, *, scale=1.0):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.with_logical_partitioning(ddpm_init(scale), tuple(names)),
                  bias_init=nn.with_logical_partitioning(layers.zeros, (names[1],)), name=name)


def _group_norm(num_groups, dtype, param_dtype, name):
  # DDPM: tf.contrib.layers.group_norm, 32 groups, epsilon 1e-6.
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
                      bias_init=nn.with_logical_partitioning(layers.zeros, ("channels",)), name=name)


def _constrain(h):
  return nn.with_logical_constraint(h, ("batch", None, None, None))


class ResBlock(nn.Module):
  """DDPM residual block with the time(+class) embedding added after the first conv."""
  out_channels: int
  num_groups: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, *, train):
    names = ("channels_in", "channels")
    h = nn.silu(_group_norm(self.num_groups, self.dtype, self.param_dtype, "norm1")(x))
    h = _conv(self.out_channels, 3, names, self.dtype, self.param_dtype, "conv1")(h)
    h = h + _dense(self.out_channels, ("embed", "channels"), self.dtype, self.param_dtype, "temb_proj")(
        nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(self.num_groups, self.dtype, self.param_dtype, "norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_channels, 3, names, self.dtype, self.param_dtype, "conv2", scale=0.0)(h)
    if x.shape[-1] != self.out_channels:
      x = _dense(self.out_channels, names, self.dtype, self.param_dtype, "skip")(x)  # DDPM's nin shortcut
    return _constrain(x + h)


def _multi_head(dense, x, num_heads):
  y = dense(x)
  return y.reshape(y.shape[:-1] + (num_heads, y.shape[-1] // num_heads))


class AttentionBlock(nn.Module):
  """DDPM's self-attention over the pixels of a feature map (DDPM: one head)."""
  num_heads: int
  num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, hgt, wid, c = x.shape
    names = ("channels_in", "channels")
    h = _group_norm(self.num_groups, self.dtype, self.param_dtype, "norm")(x).reshape(n, hgt * wid, c)
    q, k, v = (_multi_head(_dense(c, names, self.dtype, self.param_dtype, name), h, self.num_heads)
               for name in ("q", "k", "v"))
    segments = jnp.ones((n, hgt * wid), jnp.int32)
    h = layers.dot_product_attention(q, k, v, segments, segments).reshape(n, hgt, wid, c)
    h = _dense(c, names, self.dtype, self.param_dtype, "proj_out", scale=0.0)(h)
    return _constrain(x + h)


class CrossAttentionBlock(nn.Module):
  """LDM cross-attention from the pixels to the row's text tokens (0 = padding)."""
  num_heads: int
  num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, text, text_segment_ids):
    n, hgt, wid, c = x.shape
    names = ("channels_in", "channels")
    h = _group_norm(self.num_groups, self.dtype, self.param_dtype, "norm")(x).reshape(n, hgt * wid, c)
    q = _multi_head(_dense(c, names, self.dtype, self.param_dtype, "q"), h, self.num_heads)
    k, v = (_multi_head(_dense(c, ("context", "channels"), self.dtype, self.param_dtype, name), text,
                        self.num_heads) for name in ("k", "v"))
    # Every pixel belongs to the row's one example (segment 1); it sees that
    # example's text tokens only.
    pixel_segments = jnp.ones((n, hgt * wid), text_segment_ids.dtype)
    h = layers.dot_product_attention(q, k, v, pixel_segments, text_segment_ids).reshape(n, hgt, wid, c)
    h = _dense(c, names, self.dtype, self.param_dtype, "proj_out", scale=0.0)(h)
    return _constrain(x + h)


class UNet(nn.Module):
  """DDPM/LDM U-Net on packed rows of one example each (see the module docstring).

  Attributes:
    grid: (T', H', W') patch grid of the example every row holds.
    patch: (pt, ph, pw) patch size; channels: C of the pixels (or latents).
    base_channels: ch; level i has ch * channel_mults[i] channels.
    channel_mults, num_res_blocks: the U-Net's depth and width per level.
    attention_resolutions: feature-map sides (pixels) at which blocks get
      self-attention (and cross-attention with text); the middle always has it.
    dropout: in every residual block when train=True (rng stream 'dropout').
    num_heads: heads of the attention layers (DDPM: 1).
    num_groups: GroupNorm groups (DDPM: 32); must divide every channel count.
    num_classes: real classes; 0 = unconditional (labels ignored). Label
      `num_classes` is the null class for classifier-free guidance.
    class_dropout_prob: probability of replacing a row's label by the null
      class when train=True (rng stream 'dropout'), as DiT's LabelEmbedder.
    learn_sigma: output 2P values per token (prediction | variance).
    text_dim: Dt of the text tokens; 0 = no text cross-attention.
    caption_dropout_prob: probability of replacing a row's caption by the
      learned null caption when train=True (CFG training on text).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  grid: Sequence[int]
  patch: Sequence[int]
  channels: int
  base_channels: int = 128
  channel_mults: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_heads: int = 1
  num_groups: int = 32
  num_classes: int = 0
  class_dropout_prob: float = 0.1
  learn_sigma: bool = False
  text_dim: int = 0
  caption_dropout_prob: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def patch_dim(self):
    pt, ph, pw = self.patch
    return pt * ph * pw * self.channels

  @property
  def out_dim(self):
    return 2 * self.patch_dim if self.learn_sigma else self.patch_dim

  @property
  def image_shape(self):
    """(frames, height, width) of the example a row holds, in pixels."""
    return tuple(int(g) * int(p) for g, p in zip(self.grid, self.patch))

  def _check(self, x, t, labels, segment_ids, positions, text, text_segment_ids):
    if len(self.grid) != 3 or len(self.patch) != 3:
      raise ValueError(f"grid and patch must be (T', H', W') and (pt, ph, pw), got {self.grid}, {self.patch}.")
    _, height, width = self.image_shape
    check_resolution(height, width, len(self.channel_mults))
    for c in self._channel_counts():
      if c % self.num_groups:
        raise ValueError(f"{c} channels (a level's width or an up-path concatenation) are not divisible by "
                         f"num_groups={self.num_groups}.")
    for c in {self.base_channels * m for m in self.channel_mults}:
      if c % self.num_heads:
        raise ValueError(f"{c} channels are not divisible by num_heads={self.num_heads}.")
    tokens = math.prod(int(g) for g in self.grid)
    if x.ndim != 3 or x.shape[1:] != (tokens, self.patch_dim):
      raise ValueError(f"x must be [B, L={tokens}, P={self.patch_dim}] (one example of grid {tuple(self.grid)} "
                       f"per row), got {x.shape}.")
    rows = x.shape[:2]
    if t.shape != rows:
      raise ValueError(f"t must be per token [B, L]={rows}, got {t.shape}.")
    if segment_ids.shape != rows:
      raise ValueError(f"segment_ids must be [B, L]={rows}, got {segment_ids.shape}.")
    if positions.shape != rows + (3,):
      raise ValueError(f"positions must be [B, L, 3]={rows + (3,)}, got {positions.shape}.")
    if labels.ndim != 2 or labels.shape[0] != x.shape[0]:
      raise ValueError(f"labels must be per example [B, K] with B={x.shape[0]}, got {labels.shape}.")
    if self.text_dim:
      if text is None or text_segment_ids is None:
        raise ValueError(f"text_dim={self.text_dim}: pass text [B, Lt, Dt] and text_segment_ids [B, Lt].")
      if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[2] != self.text_dim:
        raise ValueError(f"text must be [B={x.shape[0]}, Lt, Dt={self.text_dim}], got {text.shape}.")
      if text_segment_ids.shape != text.shape[:2]:
        raise ValueError(f"text_segment_ids must be [B, Lt]={text.shape[:2]}, got {text_segment_ids.shape}.")
    elif text is not None:
      raise ValueError("text was passed to a U-Net built with text_dim=0 (no cross-attention).")

  def _channel_counts(self):
    ch = self.base_channels
    counts = {ch * m for m in self.channel_mults}
    # Up-path concatenations: [h, skip] of two levels' widths.
    widths = [ch] + [ch * m for m in self.channel_mults]
    counts |= {a + b for a in widths for b in widths}
    return sorted(counts)

  @nn.compact
  def __call__(self, x, t, labels, segment_ids, positions, *, train=False, text=None, text_segment_ids=None,
               text_null=None):
    """Predict per token: x [B, L, P], t [B, L] -> [B, L, P_out] float32.

    Each row must hold one example filling it (segment_ids all 1); the row's
    timestep is t[:, 0] and its label labels[:, 0]. `positions` is unused.
    text [B, Lt, Dt] and text_segment_ids [B, Lt] (1 = the row's example, 0 =
    padding) are required when text_dim > 0 and refused otherwise; text_null
    [B, K] bool replaces those rows' captions by the null caption (CFG).
    """
    self._check(x, t, labels, segment_ids, positions, text, text_segment_ids)
    rows = x.shape[0]
    frames, height, width = self.image_shape
    grid, patch = tuple(self.grid), tuple(self.patch)
    video = jax.vmap(lambda tokens: patches.unpatchify(tokens, grid, patch, self.channels))(x)
    h = video.reshape(rows * frames, height, width, self.channels).astype(self.dtype)  # frames run as images

    # Time (+ class) embedding, one per row, repeated for its frames.
    ch = self.base_channels
    temb = timestep_embedding(t[:, 0], ch).astype(self.dtype)
    temb = _dense(4 * ch, ("channels_in", "mlp"), self.dtype, self.param_dtype, "temb_dense0")(temb)
    temb = _dense(4 * ch, ("mlp", "embed"), self.dtype, self.param_dtype, "temb_dense1")(nn.silu(temb))
    if self.num_classes:
      y_embedder = layers.LabelEmbedder(self.num_classes, 4 * ch, self.class_dropout_prob, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name="y_embedder")
      row_labels = labels[:, 0]
      if train and self.class_dropout_prob > 0:
        row_labels = y_embedder.drop_labels(row_labels, self.make_rng("dropout"))
      temb = temb + y_embedder(row_labels)
    temb = jnp.repeat(temb, frames, axis=0)
    if self.text_dim:
      drop = jnp.zeros(labels.shape, bool) if text_null is None else jnp.asarray(text_null, bool)
      if train and self.caption_dropout_prob > 0:
        drop = drop | jax.random.bernoulli(self.make_rng("dropout"), self.caption_dropout_prob, labels.shape)
      null = self.param("null_text", nn.with_logical_partitioning(nn.initializers.normal(self.text_dim ** -0.5),
                                                                  ("context",)), (self.text_dim,), self.param_dtype)
      text = layers.drop_captions(text, text_segment_ids, drop, null)
      text = jnp.repeat(text.astype(self.dtype), frames, axis=0)
      text_segment_ids = jnp.repeat(text_segment_ids, frames, axis=0)

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def res_block(h, out_channels, name):
      return ResBlock(out_channels, self.num_groups, self.dropout, name=name, **kw)(h, temb, train=train)

    def attend(h, name):
      h = AttentionBlock(self.num_heads, self.num_groups, name=f"{name}_attn", **kw)(h)
      if self.text_dim:
        h = CrossAttentionBlock(self.num_heads, self.num_groups, name=f"{name}_cross", **kw)(
            h, text, text_segment_ids)
      return h

    names = ("channels_in", "channels")
    h = _constrain(_conv(ch, 3, ("patch", "channels"), self.dtype, self.param_dtype, "conv_in")(h))
    skips = [h]
    levels = len(self.channel_mults)
    for level, mult in enumerate(self.channel_mults):
      for block in range(self.num_res_blocks):
        h = res_block(h, ch * mult, f"down_{level}_block_{block}")
        if h.shape[1] in self.attention_resolutions:
          h = attend(h, f"down_{level}_block_{block}")
        skips.append(h)
      if level != levels - 1:
        h = _conv(h.shape[-1], 3, names, self.dtype, self.param_dtype, f"down_{level}_downsample", strides=2)(h)
        skips.append(h)

    h = res_block(h, h.shape[-1], "mid_block_0")
    h = attend(h, "mid")
    h = res_block(h, h.shape[-1], "mid_block_1")

    for level in reversed(range(levels)):
      for block in range(self.num_res_blocks + 1):
        h = res_block(jnp.concatenate([h, skips.pop()], axis=-1), ch * self.channel_mults[level],
                      f"up_{level}_block_{block}")
        if h.shape[1] in self.attention_resolutions:
          h = attend(h, f"up_{level}_block_{block}")
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        h = _conv(h.shape[-1], 3, names, self.dtype, self.param_dtype, f"up_{level}_upsample")(h)

    h = nn.silu(_group_norm(self.num_groups, self.dtype, self.param_dtype, "norm_out")(h))
    out_channels = 2 * self.channels if self.learn_sigma else self.channels
    h = _conv(out_channels, 3, ("channels_in", "patch"), self.dtype, self.param_dtype, "conv_out", scale=0.0)(h)
    h = h.astype(jnp.float32).reshape(rows, frames, height, width, out_channels)

    # Patchify back; with learn_sigma the prediction and the variance values are
    # patchified separately so each keeps the input's (pt, ph, pw, C) order.
    to_tokens = jax.vmap(lambda v: patches.patchify(v, patch)[0])
    parts = [to_tokens(h[..., i * self.channels:(i + 1) * self.channels])
             for i in range(out_channels // self.channels)]
    out = jnp.concatenate(parts, axis=-1)
    return nn.with_logical_constraint(out, ("batch", "length", "patch"))


def check_resolution(height: int, width: int, levels: int) -> None:
  """A U-Net of `levels` levels halves the image levels - 1 times."""
  factor = 2 ** (levels - 1)
  if height % factor or width % factor:
    raise ValueError(f"image of {height}x{width} px cannot be halved {levels - 1} times by a U-Net of {levels} "
                     f"levels: its sides must be multiples of {factor}.")


# ---------------------------------------------------------------------------
# Variants: DDPM's CIFAR-10 model (Ho et al. 2020, 35.7M params) and CPU sizes.
# ---------------------------------------------------------------------------

VARIANTS = {
    "ddpm_cifar": dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                       dropout=0.1, num_heads=1, num_groups=32),
    "small": dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,),
                  dropout=0.1, num_heads=1, num_groups=8),
    "smoke": dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                  dropout=0.0, num_heads=2, num_groups=8),
}


def check_image_size(variant: str, height: int, width: int) -> None:
  """ValueError unless `variant` exists and can halve a height x width image as often as it needs."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown U-Net variant {variant!r}; valid: {sorted(VARIANTS)}.")
  check_resolution(height, width, len(VARIANTS[variant]["channel_mults"]))


def build_unet(model_config, *, patch_dim, grid, patch, channels, dtype=jnp.float32,
               param_dtype=jnp.float32) -> UNet:
  """U-Net from a config's `model` section (configs/ddpm_digits.py, c.model).

  Reads variant, num_classes (0 = unconditional), class_dropout_prob,
  learn_sigma, and optionally dropout, num_heads, text_dim (text features;
  0 = none) and caption_dropout_prob. grid (T', H', W'), patch (pt, ph, pw) and channels
  describe the one example each row holds; patch_dim must equal
  pt * ph * pw * channels.
  """
  cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  variant = cfg.get("variant")
  if variant not in VARIANTS:
    raise ValueError(f"Unknown U-Net variant {variant!r}; valid: {sorted(VARIANTS)}.")
  if "num_classes" not in cfg:
    raise ValueError("model config needs num_classes (0 = unconditional).")
  if patch_dim != math.prod(patch) * channels:
    raise ValueError(f"patch_dim={patch_dim} disagrees with patch {tuple(patch)} and {channels} channels.")
  size = dict(VARIANTS[variant])
  size.update({k: cfg[k] for k in ("dropout", "num_heads") if k in cfg})
  return UNet(
      grid=tuple(int(g) for g in grid),
      patch=tuple(int(p) for p in patch),
      channels=int(channels),
      num_classes=cfg["num_classes"],
      class_dropout_prob=cfg.get("class_dropout_prob", 0.1),
      learn_sigma=cfg.get("learn_sigma", False),
      text_dim=cfg.get("text_dim", 0),
      caption_dropout_prob=cfg.get("caption_dropout_prob", 0.1),
      dtype=dtype,
      param_dtype=param_dtype,
      **size,
  )
