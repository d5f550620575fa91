"""Diffusion Transformer (DiT, Peebles & Xie 2023) over packed spacetime patches.

One module serves the class-conditional image DiT and the packed video DiT: an
image is a one-frame video, and every batch is packed (docs/design.md, "The packed
batch"). Per token the model sees a patch x [P] (P = pt*ph*pw*C, flattened in
(pt, ph, pw, C) order), its timestep t, its example's class label (through
`segment_ids`) and its (t, h, w) position.

Architecture, as DiT's models.py: patch embedding (a Dense equal to DiT's
strided conv), fixed 2D sin-cos positions (or 3D RoPE inside attention for
video), timestep MLP + class table summed into c, `depth` blocks with
adaLN-Zero modulation from SiLU(c), and a final adaLN layer with a zero-init
linear. Differences forced by packing: attention is restricted to tokens of the
same example, and an example has up to two clocks (its noise level t and, for
conditioning frames, the clean t = 0). c and every adaLN modulation are
computed once per (example, clock), as DiT computes them once per image, and
gathered to the tokens (`conditioning_clocks`): a per-token c would cost each
block 6 width^2 multiply-adds a token, half again the block's own work.
`adaln='single'` is PixArt-alpha's adaLN-single: one shared 6 x width
projection of c plus a learned per-block table, instead of a Dense per block.

Output layout: [B, L, P_out] float32; with learn_sigma, P_out = 2P and
out[..., :P] is the prediction (eps / v / x0), out[..., P:] the variance
interpolation values, each in the same (pt, ph, pw, C) order as the input.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any

POS_EMBEDDINGS = ("sincos2d", "sincos3d", "rope3d")
REMAT_POLICIES = ("none", "full", "dots")
ADALN_KINDS = ("zero", "single")


def modulate(x, shift, scale):
  """DiT's adaLN modulation x * (1 + scale) + shift (here per token)."""
  return x * (1 + scale) + shift


def example_one_hot(segment_ids, num_examples: int):
  """[B, L, K] bool: token l belongs to example k + 1 (padding, id 0, to none)."""
  return segment_ids[..., None] == jnp.arange(1, num_examples + 1, dtype=segment_ids.dtype)


def conditioning_clocks(t, segment_ids, num_examples: int):
  """Each token's (example, clock) slot and the time of every slot.

  A packed row holds at most K examples; the tokens of one example share its
  noise level t, except its conditioning tokens, which carry the clean t = 0:
  so an example has at most two clocks, and the row at most 2K. Slot k is
  example k's larger t (its noisy tokens), slot K + k its smaller one (its
  conditioning tokens, when it has any). The clocks are read off t itself, so
  callers pass per-token t as before; the rule it relies on, at most two
  values of t within one example, holds for every caller here (training's
  conditioning masks, the samplers' kept tokens, SDEdit's per-example start).

  Args:
    t: [B, L] float, per-token time.
    segment_ids: [B, L] int, 0 = padding, k >= 1 = example k.
    num_examples: K.

  Returns:
    slot [B, L] int32 in [0, 2K) (padding takes slot 0), and t_slot [B, 2K]
    float32 (0 for a slot without tokens).
  """
  example = jnp.maximum(segment_ids - 1, 0)
  one_hot = example_one_hot(segment_ids, num_examples)
  t = t.astype(jnp.float32)
  t_max = jnp.max(jnp.where(one_hot, t[..., None], -jnp.inf), axis=1)  # [B, K]
  t_min = jnp.min(jnp.where(one_hot, t[..., None], jnp.inf), axis=1)
  t_slot = jnp.concatenate([t_max, t_min], axis=1)
  t_slot = jnp.where(jnp.isfinite(t_slot), t_slot, 0.0)
  own_max = jnp.take_along_axis(t_max, example, axis=1)
  slot = example + num_examples * (t < own_max).astype(example.dtype)
  return jnp.where(segment_ids > 0, slot, 0).astype(jnp.int32), t_slot


# Up to this many (example, clock) slots a row (K <= 8: the CPU recipes), to_tokens selects.
SELECT_MAX_SLOTS = 16


def to_tokens(values, slot):
  """Per-slot values [B, N, F] -> per-token [B, L, F]: token l takes values[:, slot[:, l]].

  With few slots, a chain of N selects: XLA fuses it into the consumer (the modulation), where
  its CPU gather wrote the [B, L, F] array out and its gradient scattered it back; 5% of the
  video quickstart's train step, 3-5% of the tiny DiT's (BENCHMARKS.md). Pod rows (K = 32, so
  N = 64 slots) keep the gather rather than 64 selects per element.
  """
  if values.shape[1] <= SELECT_MAX_SLOTS:
    return _select_slots(values, slot)
  return jnp.take_along_axis(values, slot[..., None], axis=1)


@jax.custom_vjp
def _select_slots(values, slot):
  out = jnp.broadcast_to(values[:, :1], slot.shape + values.shape[2:])
  for n in range(1, values.shape[1]):
    out = jnp.where((slot == n)[..., None], values[:, n:n + 1], out)
  return out


def _select_slots_fwd(values, slot):
  return _select_slots(values, slot), (slot, values.shape[1])


def _select_slots_bwd(residuals, grad):
  slot, num_slots = residuals
  one_hot = jax.nn.one_hot(slot, num_slots, dtype=grad.dtype)  # [B, L, N]: the sum per slot is a matmul
  return jnp.einsum("bln,blf->bnf", one_hot, grad), None


_select_slots.defvjp(_select_slots_fwd, _select_slots_bwd)


@jax.custom_vjp
def write_out_grad(x):
  """Identity whose gradient XLA's CPU compiler writes out once instead of recomputing it.

  XLA's CPU fusion copies cheap elementwise producers into every consumer, and it has no cap on a
  fusion's operands. The backward pass of a stack of unrolled residual blocks sums each block's
  LayerNorm and gate gradients into the residual stream's gradient, an elementwise chain, and XLA
  re-fused that whole chain into each block's consumers (fusions of up to 200 operands, work
  quadratic in depth: 14% of a DiT-S/2 step's thread time). A gather (here of every row, in order)
  is a producer it never duplicates, so each block's residual gradient is computed once. An
  optimization barrier does not do it: the CPU pipeline drops barriers before fusion.
  """
  return x


def _write_out_grad_fwd(x):
  return x, None


def _write_out_grad_bwd(_, grad):
  # Every token's row, in order, of the [B * L, width] view: gathered along the leading axis the
  # result keeps the layout (along L, XLA transposes it back), and B * L is never 1, which XLA
  # would simplify to a slice.
  rows = grad.reshape(-1, grad.shape[-1])
  rows = jnp.take(rows, jnp.arange(rows.shape[0]), axis=0, unique_indices=True, indices_are_sorted=True)
  return (rows.reshape(grad.shape),)


write_out_grad.defvjp(_write_out_grad_fwd, _write_out_grad_bwd)


def _layer_norm(dtype, name):
  # DiT: LayerNorm(elementwise_affine=False, eps=1e-6); adaLN supplies scale/shift.
  # Two-pass variance (as torch): E[x^2] - E[x]^2 loses digits when |mean| >> std.
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False, dtype=dtype,
                      name=name)


def _zero_dense(features, out_name, dtype, param_dtype, name):
  """Zero-initialised Dense (adaLN-Zero modulation and DiT's final linear)."""
  return layers.Dense(features, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nn.with_logical_partitioning(layers.zeros, ("embed", out_name)),
                      bias_init=nn.with_logical_partitioning(layers.zeros, (out_name,)), name=name)


class CrossAttention(nn.Module):
  """Multi-head attention from video tokens to their own example's text tokens.

  PixArt-alpha's text conditioning (Chen et al. 2023), with the packed rule:
  token i of example k attends only to text tokens whose text_segment_id is k
  (layers.dot_product_attention with q/kv segment ids); a token whose
  example has no text gets zeros. The output projection is zero-initialised,
  so a fresh block is still the identity (as adaLN-Zero intends).
  """
  num_heads: int
  backend: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, segment_ids, text, text_segment_ids):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))

    def project(name, inputs, length_name):
      y = layers.MultiAxisDense((width, self.num_heads, head_dim), ("embed", "heads", "kv"), init,
                                ("heads", "kv"), dtype=self.dtype, param_dtype=self.param_dtype, name=name)(inputs)
      return nn.with_logical_constraint(y, ("batch", length_name, "heads", "kv"))

    q = project("query", x, "length")
    k, v = project("key", text, "text_length"), project("value", text, "text_length")
    out = layers.dot_product_attention(q, k, v, segment_ids, text_segment_ids, backend=self.backend)
    return layers.MultiAxisDense((self.num_heads, head_dim, width), ("heads", "kv", "embed"),
                                 layers.zeros, ("embed",), dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="proj")(out)


def pool_captions(text, text_segment_ids, num_examples: int):
  """[B, K, Dt]: the mean of each example's text tokens (zeros for an example without text).

  all-MiniLM-L6-v2's sentence embedding is this mean (over its unpadded tokens).
  """
  one_hot = example_one_hot(text_segment_ids, num_examples).astype(text.dtype)  # [B, Lt, K]
  total = jnp.einsum("blk,bld->bkd", one_hot, text)
  return total / jnp.maximum(jnp.sum(one_hot, axis=1), 1.0)[..., None]


class CaptionEmbedder(nn.Module):
  """Text-encoder outputs [B, Lt, Dt] -> [B, Lt, width] (PixArt's caption MLP),
  with caption dropout for classifier-free guidance; also returns each
  example's pooled caption [B, K, Dt] (pool_captions, after the dropout).

  A dropped example's text tokens are all replaced by one learned null vector
  `null_text` [Dt] (layers.drop_captions). `drop` [B, K] says which examples
  to drop.
  """
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text, text_segment_ids, drop):
    text_dim = text.shape[-1]
    null = self.param("null_text", nn.with_logical_partitioning(nn.initializers.normal(text_dim ** -0.5),
                                                                ("text_embed",)), (text_dim,), self.param_dtype)
    text = layers.drop_captions(text, text_segment_ids, drop, null)
    init = nn.initializers.xavier_uniform()
    h = layers.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(init, ("text_embed", "embed")),
                     bias_init=nn.with_logical_partitioning(layers.zeros, ("embed",)), name="fc1")(
                         text.astype(self.dtype))
    h = nn.gelu(h, approximate=True)
    h = layers.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(init, ("embed", "embed_out")),
                     bias_init=nn.with_logical_partitioning(layers.zeros, ("embed_out",)), name="fc2")(h)
    return nn.with_logical_constraint(h, ("batch", "text_length", "embed")), pool_captions(text, text_segment_ids,
                                                                                        drop.shape[1])


class PooledTextEmbedder(nn.Module):
  """A pooled caption [..., Dt] -> [..., width]: Dense -> SiLU -> Dense (SD3's pooled-text MLP)."""
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled):
    init = nn.initializers.normal(0.02)  # as the timestep MLP, whose output it is added to
    h = layers.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(init, ("text_embed", "embed")),
                     bias_init=nn.with_logical_partitioning(layers.zeros, ("embed",)), name="fc1")(
                         pooled.astype(self.dtype))
    return layers.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.with_logical_partitioning(init, ("embed", "embed_out")),
                        bias_init=nn.with_logical_partitioning(layers.zeros, ("embed_out",)), name="fc2")(nn.silu(h))


class DiTBlock(nn.Module):
  """DiT block with adaLN-Zero: gate * sublayer(modulate(LN(x), shift, scale)),
  plus, with text, an ungated cross-attention sublayer between self-attention
  and the MLP (PixArt-alpha's block).

  `cond` is per (example, clock) slot, [B, N, .]: c itself for adaln='zero'
  (the block's own Dense makes the 6 modulations), the shared 6 x width
  projection of c for adaln='single' (the block adds its learned table). The
  modulations reach the tokens through `slot` [B, L]. `rope`: the RoPE tables
  (layers.rope_3d_tables) or None.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  attention_backend: str = "xla"
  cross_attention: bool = False
  adaln: str = "zero"
  write_out_residual_grads: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond, slot, segment_ids, rope, text=None, text_segment_ids=None):
    width = x.shape[-1]
    if self.write_out_residual_grads:
      x = write_out_grad(x)
    if self.adaln == "single":
      table = self.param("scale_shift_table",
                         nn.with_logical_partitioning(nn.initializers.normal(width ** -0.5), ("modulation",)),
                         (6 * width,), self.param_dtype)
      modulation = cond + table.astype(cond.dtype)
    else:
      modulation = _zero_dense(6 * width, "modulation", self.dtype, self.param_dtype, "adaLN_modulation")(
          nn.silu(cond))
    modulation = to_tokens(modulation, slot)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)

    h = modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
    h = layers.SelfAttention(self.num_heads, qk_norm=self.qk_norm,
                             backend=self.attention_backend, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="attn")(h, segment_ids, rope)
    x = x + gate_msa * h
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    if self.cross_attention:
      h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                       scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                       bias_init=nn.with_logical_partitioning(layers.zeros, ("embed",)), name="norm_cross")(x)
      x = x + CrossAttention(self.num_heads, backend=self.attention_backend, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="cross_attn")(h, segment_ids, text, text_segment_ids)
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    h = modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
    h = layers.Mlp(int(width * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(h)
    x = x + gate_mlp * h
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None  # (carry, per-layer output) as nn.scan wants


class FinalLayer(nn.Module):
  """DiT's final layer: adaLN (shift, scale) then a zero-initialised linear.

  c is per slot [B, N, width] (see DiTBlock); adaln='single' takes shift and
  scale as c plus a learned table (PixArt-alpha's T2IFinalLayer).
  """
  out_dim: int
  adaln: str = "zero"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, slot):
    width = x.shape[-1]
    if self.adaln == "single":
      table = self.param("scale_shift_table",
                         nn.with_logical_partitioning(nn.initializers.normal(width ** -0.5), ("modulation",)),
                         (2 * width,), self.param_dtype)
      modulation = jnp.concatenate([c, c], axis=-1) + table.astype(c.dtype)
    else:
      modulation = _zero_dense(2 * width, "modulation", self.dtype, self.param_dtype, "adaLN_modulation")(
          nn.silu(c))
    shift, scale = jnp.split(to_tokens(modulation, slot), 2, axis=-1)
    x = modulate(_layer_norm(self.dtype, "norm_final")(x), shift, scale)
    return _zero_dense(self.out_dim, "patch", self.dtype, self.param_dtype, "linear")(x)


class DiT(nn.Module):
  """Class-conditional DiT over packed rows of patches.

  Attributes:
    patch_dim: P, features of one input patch.
    width, depth, num_heads, mlp_ratio: transformer size (see VARIANTS).
    num_classes: real classes; label `num_classes` is the null (unconditional)
      class. 0 = no class conditioning (labels are ignored).
    text_dim: width Dt of the text-encoder outputs; > 0 adds caption
      embedding and a cross-attention sublayer to every block (text-to-video).
    pooled_text: with text, also add an MLP of each example's mean caption
      token to c (SD3's pooled text conditioning), so the adaLN modulations
      see the whole caption, not only the cross-attention.
    caption_dropout_prob: probability of replacing an example's caption by the
      learned null caption when train=True (CFG training on text).
    class_dropout_prob: probability of replacing an example's label by the null
      class when train=True (classifier-free guidance training).
    learn_sigma: output 2P values per token (prediction | variance) instead of P.
    pos_embedding: 'sincos2d' (DiT's fixed (h, w) embedding added after the
      patch embedding), 'sincos3d' (factorised (t, h, w) sin-cos) or 'rope3d'
      (3D rotary embedding on q and k; no additive embedding).
    rope_split: fractions of the RoPE rotation pairs for (t, h, w).
    qk_norm: LayerNorm on q and k per head.
    adaln: 'zero' (DiT's adaLN-Zero: a 6 x width Dense of c in every block)
      or 'single' (PixArt-alpha's adaLN-single: one shared Dense, a learned
      6 x width table per block).
    attention_backend: see layers.dot_product_attention.
    scan_layers: run the blocks through nn.scan (params stacked on a leading
      'layers' axis, under 'blocks') instead of a Python loop ('blocks_0', ...).
    scan_unroll: layers per iteration of the scanned loop; depth unrolls it
      whole with the params still stacked (the same checkpoints). XLA's CPU
      while loop stacks every layer's residuals into zero-filled buffers and
      slices them back, so on CPU unrolled is faster; TPUs keep 1 (compile
      time, memory). See build_dit's 0 = auto.
    write_out_residual_grads: have XLA compute each block's residual-stream
      gradient once (see write_out_grad); build_dit sets it on CPU when the
      blocks are not a rolled loop.
    remat: 'none', 'full' (recompute everything) or 'dots' (save matmuls
      without batch dims) per block.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  patch_dim: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  text_dim: int = 0
  pooled_text: bool = False
  caption_dropout_prob: float = 0.1
  learn_sigma: bool = True
  pos_embedding: str = "sincos2d"
  rope_split: Sequence[float] = (0.25, 0.375, 0.375)
  qk_norm: bool = False
  adaln: str = "zero"
  attention_backend: str = "xla"
  scan_layers: bool = True
  scan_unroll: int = 1
  write_out_residual_grads: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def out_dim(self):
    return 2 * self.patch_dim if self.learn_sigma else self.patch_dim

  def _check_inputs(self, x, t, labels, segment_ids, positions):
    if self.pos_embedding not in POS_EMBEDDINGS:
      raise ValueError(f"Unknown pos_embedding {self.pos_embedding!r}; valid: {POS_EMBEDDINGS}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat {self.remat!r}; valid: {REMAT_POLICIES}.")
    if self.adaln not in ADALN_KINDS:
      raise ValueError(f"Unknown adaln {self.adaln!r}; valid: {ADALN_KINDS}.")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
    if x.ndim != 3 or x.shape[-1] != self.patch_dim:
      raise ValueError(f"x must be [B, L, patch_dim={self.patch_dim}], got {x.shape}.")
    batch_len = x.shape[:2]
    if t.shape != batch_len:
      raise ValueError(f"t must be per token [B, L]={batch_len}, got {t.shape}.")
    if segment_ids.shape != batch_len:
      raise ValueError(f"segment_ids must be [B, L]={batch_len}, got {segment_ids.shape}.")
    if positions.shape != batch_len + (3,):
      raise ValueError(f"positions must be [B, L, 3]={batch_len + (3,)}, got {positions.shape}.")
    if labels.ndim != 2 or labels.shape[0] != x.shape[0]:
      raise ValueError(f"labels must be per example [B, K] with B={x.shape[0]}, got {labels.shape}.")

  def condition_slots(self, t, segment_ids, num_examples):
    """(slot [B, L], t_slot [B, N], slot_example [B, N]): each token's
    conditioning slot, each slot's time and example index. Here N = 2K (see
    conditioning_clocks); the tests' per-token reference overrides this with
    one slot per token."""
    slot, t_slot = conditioning_clocks(t, segment_ids, num_examples)
    slot_example = jnp.broadcast_to(jnp.tile(jnp.arange(num_examples, dtype=jnp.int32), 2), t_slot.shape)
    return slot, t_slot, slot_example

  def _block_stack(self):
    block_cls = DiTBlock
    if self.remat != "none":
      policy = None if self.remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
      # prevent_cse is only needed outside scan (scan already stops CSE across steps).
      block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not self.scan_layers)
    kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
                  attention_backend=self.attention_backend, cross_attention=self.text_dim > 0,
                  adaln=self.adaln, write_out_residual_grads=self.write_out_residual_grads,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * 6, length=self.depth, unroll=self.scan_unroll,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      return [scanned(**kwargs, name="blocks")]
    return [block_cls(**kwargs, name=f"blocks_{i}") for i in range(self.depth)]

  @nn.compact
  def __call__(self, x, t, labels, segment_ids, positions, *, train=False, text=None, text_segment_ids=None,
               text_null=None):
    """Predict per token.

    Args:
      x: [B, L, P] noisy patches.
      t: [B, L] float timestep of each token (gathered per example by the
        caller; conditioning tokens may carry t = 0). Within one example t
        takes at most two values (see conditioning_clocks).
      labels: [B, K] int class of each example of the row (null = num_classes).
      segment_ids: [B, L] int, 0 = padding, k >= 1 = example k.
      positions: [B, L, 3] int (t, h, w) patch coordinates in its example.
      train: enables label and caption dropout (rng stream 'dropout').
      text: [B, Lt, Dt] text-encoder outputs of the row's captions, packed
        (required when text_dim > 0).
      text_segment_ids: [B, Lt] int, the example each text token belongs to; 0 = padding.
      text_null: [B, K] bool, examples whose caption is replaced by the null
        caption (the unconditional branch of CFG); default none.

    Returns:
      [B, L, P_out] float32. Padding tokens hold finite values to be masked.
    """
    self._check_inputs(x, t, labels, segment_ids, positions)
    x = layers.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(layers.xavier_uniform(), ("patch", "embed")),
                     bias_init=nn.with_logical_partitioning(layers.zeros, ("embed",)), name="x_embedder")(
                         x.astype(self.dtype))
    if self.pos_embedding == "sincos2d":
      x = x + layers.sincos_2d_embedding(positions, self.width).astype(self.dtype)
    elif self.pos_embedding == "sincos3d":
      x = x + layers.sincos_3d_embedding(positions, self.width).astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # Conditioning per (example, clock) slot [B, N, width], not per token.
    slot, t_slot, slot_example = self.condition_slots(t, segment_ids, labels.shape[1])
    c = layers.TimestepEmbedder(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="t_embedder")(t_slot)
    if self.num_classes > 0:
      y_embedder = layers.LabelEmbedder(self.num_classes, self.width, self.class_dropout_prob, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name="y_embedder")
      if train and self.class_dropout_prob > 0:
        labels = y_embedder.drop_labels(labels, self.make_rng("dropout"))  # per example, as DiT
      c = c + y_embedder(jnp.take_along_axis(labels, slot_example, axis=1))
    c = nn.with_logical_constraint(c, ("batch", None, "embed"))

    text_tokens = None
    if self.text_dim > 0:
      if text is None or text_segment_ids is None:
        raise ValueError(f"this DiT has text_dim={self.text_dim}: pass text [B, Lt, Dt] and text_segment_ids [B, Lt]")
      if text.ndim != 3 or text.shape[-1] != self.text_dim or text_segment_ids.shape != text.shape[:2]:
        raise ValueError(f"text must be [B, Lt, {self.text_dim}] with text_segment_ids [B, Lt]; got "
                         f"{text.shape}, {text_segment_ids.shape}")
      drop = jnp.zeros(labels.shape, bool) if text_null is None else jnp.asarray(text_null, bool)
      if train and self.caption_dropout_prob > 0:
        drop = drop | jax.random.bernoulli(self.make_rng("dropout"), self.caption_dropout_prob, labels.shape)
      text_tokens, pooled = CaptionEmbedder(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                            name="caption_embedder")(text, text_segment_ids, drop)
      if self.pooled_text:  # SD3: the whole caption in c too, so every modulation sees it from step one
        pooled = PooledTextEmbedder(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="pooled_text_embedder")(pooled)
        c = c + jnp.take_along_axis(pooled, slot_example[..., None], axis=1)

    cond = c
    if self.adaln == "single":  # PixArt's t_block: the one modulation projection all blocks share
      cond = layers.Dense(6 * self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                   ("embed", "modulation")),
                          bias_init=nn.with_logical_partitioning(layers.zeros, ("modulation",)), name="t_block")(
                              nn.silu(c))
    rope = None
    if self.pos_embedding == "rope3d":  # once for all layers
      rope = layers.rope_3d_tables(positions, self.width // self.num_heads, split=tuple(self.rope_split))
    for block in self._block_stack():
      x, _ = block(x, cond, slot, segment_ids, rope, text_tokens, text_segment_ids)

    out = FinalLayer(self.out_dim, adaln=self.adaln, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="final_layer")(x, c, slot)
    out = nn.with_logical_constraint(out, ("batch", "length", "patch"))
    return out.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Variants (DiT paper, Table 1) x spatial patch size; small rows for CPU.
# ---------------------------------------------------------------------------

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

VARIANTS = {
    f"{size}/{patch}": dict(depth=depth, width=width, num_heads=heads, patch=patch)
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
# A ~3B-parameter video recipe for pods: with caption cross-attention a block
# holds about 22 width^2 weights (attention 4, cross-attention 4, MLP 8, adaLN 6),
# so 28 x 22 x 2304^2 = 3.3B; head dim 128.
VARIANTS["3B/2"] = dict(depth=28, width=2304, num_heads=18, patch=2)
VARIANTS["tiny"] = dict(depth=4, width=128, num_heads=4, patch=2)
VARIANTS["smoke"] = dict(depth=2, width=32, num_heads=2, patch=2)


def build_dit(model_config, *, patch_dim, dtype=jnp.float32, param_dtype=jnp.float32) -> DiT:
  """DiT from a config's `model` section (configs/dit_image.py, c.model).

  Reads variant, num_classes, class_dropout_prob, learn_sigma, pos_embedding,
  attention_backend, scan_layers, remat, and optionally mlp_ratio, qk_norm,
  adaln, pooled_text, rope_split, scan_unroll (layers per loop iteration; 0 = auto: the
  whole depth when JAX's default backend is the CPU, else 1). `patch_dim` is P of the data; the variant's `patch` (spatial
  patch size) must agree with the data config, which the caller checks.
  """
  cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  variant = cfg.get("variant")
  if variant not in VARIANTS:
    raise ValueError(f"Unknown DiT variant {variant!r}; valid: {sorted(VARIANTS)}.")
  if "num_classes" not in cfg:
    raise ValueError("model config needs num_classes (0 for none).")
  size = VARIANTS[variant]
  optional = {k: cfg[k] for k in ("mlp_ratio", "qk_norm", "adaln", "pooled_text") if k in cfg}
  unroll = int(cfg.get("scan_unroll", 1))
  if unroll == 0:  # auto: whole on CPU, where the loop costs time; a loop on accelerators
    unroll = size["depth"] if jax.default_backend() == "cpu" else 1
  scan_layers = cfg.get("scan_layers", True)
  # Only XLA's CPU fusion re-fuses the residual gradient chain, and only across unrolled blocks.
  write_out_residual_grads = jax.default_backend() == "cpu" and (not scan_layers or unroll > 1)
  if "rope_split" in cfg:
    optional["rope_split"] = tuple(cfg["rope_split"])
  return DiT(
      patch_dim=patch_dim,
      width=size["width"],
      depth=size["depth"],
      num_heads=size["num_heads"],
      num_classes=cfg["num_classes"],
      class_dropout_prob=cfg.get("class_dropout_prob", 0.1),
      text_dim=cfg.get("text_dim", 0),
      caption_dropout_prob=cfg.get("caption_dropout_prob", 0.1),
      learn_sigma=cfg.get("learn_sigma", True),
      pos_embedding=cfg.get("pos_embedding", "sincos2d"),
      attention_backend=cfg.get("attention_backend", "xla"),
      scan_layers=scan_layers,
      scan_unroll=unroll,
      write_out_residual_grads=write_out_residual_grads,
      remat=cfg.get("remat", "none"),
      dtype=dtype,
      param_dtype=param_dtype,
      **optional,
  )
