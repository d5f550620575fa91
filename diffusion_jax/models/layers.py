"""Transformer building blocks shared by the diffusion backbones.

Everything works on packed rows (docs/design.md, "The packed batch"): activations are
[B, L, ...], `segment_ids` [B, L] say which example a token belongs to (0 =
padding) and `positions` [B, L, 3] give its (t, h, w) patch coordinates inside
that example.

Sharding: modules only name logical axes ('batch', 'length', 'embed', 'mlp',
'heads', 'kv', 'patch', 'classes', 'layers'); every parameter carries a name on
each of its dims through `nn.with_logical_partitioning`, and the mesh rules in
the config decide how the names map to mesh axes.

Initialisers follow DiT (Peebles & Xie, 2023), whose linear layers use
xavier_uniform with zero bias (timm's Attention and Mlp), and whose timestep
MLP and class table use normal(0.02).
"""
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform
zeros = nn.initializers.zeros_init()


def _named(init, names):
  return nn.with_logical_partitioning(init, names)


def tokens_dot(x, kernel, num_contracted: int = 1, precision=None):
  """x's trailing `num_contracted` axes against kernel's leading ones (a Dense's product).

  For a CPU program, x's leading axes (batch, length) are merged into one row axis first
  (a bitcast) and it is one 2-D matmul. The reason is the weight gradient: of a
  [B, L, D] x [D, F] product it contracts two axes, B and L, and XLA's CPU compiler lowers
  that with a transposing copy of the [B, L, F] gradient; of the [B * L, D] x [D, F]
  product it is one plain matmul (same arithmetic; the quickstart DiT step ~8% faster,
  BENCHMARKS.md). A TPU program keeps the plain contraction: compiled for a v5p slice,
  the 2-D form held ~4.5% more temporaries at the same FLOPs.
  """
  lead = x.shape[:x.ndim - num_contracted]
  if _target_platform() != "cpu":
    contracted = tuple(range(len(lead), x.ndim))
    return jax.lax.dot_general(x, kernel, ((contracted, tuple(range(num_contracted))), ((), ())),
                               precision=precision)
  inner = math.prod(kernel.shape[:num_contracted])
  y = jnp.dot(x.reshape(math.prod(lead), inner), kernel.reshape(inner, -1), precision=precision)
  return y.reshape(lead + kernel.shape[num_contracted:])


def _target_platform() -> str:
  """The platform the program being traced is for: the active mesh's (an AOT compile for a TPU
  slice on a CPU host is a TPU program), else the default backend's."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _tokens_dot_general(x, kernel, dimension_numbers, precision=None):
  """nn.Dense's dot_general (x's last axis against the kernel's first) through tokens_dot."""
  if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())):
    raise ValueError(f"tokens_dot takes a Dense's contraction only, got {dimension_numbers}")
  return tokens_dot(x, kernel, 1, precision)


# nn.Dense whose product is tokens_dot: the Dense of every layer here that runs over tokens.
Dense = functools.partial(nn.Dense, dot_general=_tokens_dot_general)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------

# 'xla': the segment-masked einsum/softmax reference, any platform.
# 'gpu': jax.nn.dot_product_attention with a mask built from the segment ids;
#   its cuDNN flash kernel on a GPU (bf16/fp16 inputs), its XLA path elsewhere
#   (so the wrapper runs and is tested on CPU).
# 'splash': the Pallas TPU splash-attention kernel with SegmentIds (TPU only).
# 'splash_interpret': the same kernel run by the Pallas interpreter (any
#   platform; slow, for tests and debugging).
ATTENTION_BACKENDS = ("xla", "gpu", "splash", "splash_interpret")

# Splash's sequence tiles: lengths are padded (segment id 0) to a multiple of
# SPLASH_LENGTH_MULTIPLE (the TPU lane width), and the tile is the largest of
# SPLASH_BLOCK_SIZES that divides the padded length.
SPLASH_LENGTH_MULTIPLE = 128
SPLASH_BLOCK_SIZES = (512, 256, 128)


def _segment_mask(q_segment_ids, kv_segment_ids):
  """[B, 1, Lq, Lk] bool: same example and neither token is padding."""
  same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  real = (q_segment_ids[:, :, None] != 0) & (kv_segment_ids[:, None, :] != 0)
  return (same & real)[:, None]


def _query_has_key(q_segment_ids, kv_segment_ids):
  """[B, Lq] bool: the query is not padding and some key shares its segment id.

  Without building the [Lq, Lk] mask (the kernels never do): a binary search
  of each query's id in its row's sorted key ids, O(L log L). For
  self-attention (the same ids on both sides) every real query has a key.
  """
  real = q_segment_ids != 0
  if q_segment_ids is kv_segment_ids:
    return real
  sorted_kv = jnp.sort(kv_segment_ids, axis=-1)
  index = jax.vmap(jnp.searchsorted)(sorted_kv, q_segment_ids)
  index = jnp.minimum(index, sorted_kv.shape[-1] - 1)
  return real & (jnp.take_along_axis(sorted_kv, index, axis=-1) == q_segment_ids)


def _zero_keyless_queries(out, has_key):
  # A select, not a product: a kernel's arbitrary (finite) output on a query
  # without keys neither leaks forward nor sends gradient back.
  return jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype))


def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids):
  # Scale q ([B, L, H, D]) rather than the logits ([B, H, L, L]): one pass less over the big array.
  q = (q.astype(jnp.float32) / math.sqrt(q.shape[-1])).astype(q.dtype)
  # Heads first ([B, H, L, D]): batched matmuls with leading batch dims, which XLA's CPU
  # matmul kernels take without a relayout.
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  out = _masked_attention(q, k, v, q_segment_ids, kv_segment_ids)
  return jnp.swapaxes(out, 1, 2)


def _attention_exps(q, k, q_segment_ids, kv_segment_ids):
  """exp(logits - row max) [B, H, Lq, Lk] (exactly 0 where masked) and the row sums [B, H, Lq, 1]."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  # A finite fill (not -inf) keeps fully masked rows (padding queries, examples
  # without text) NaN-free in both passes; the caller zeroes their output.
  logits = jnp.where(_segment_mask(q_segment_ids, kv_segment_ids), logits, jnp.float32(-1e30))
  exps = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  # The barrier keeps XLA's CPU compiler from fusing the exp and the reductions into
  # the next matmul, which recomputes them per tile (the forward pass ran 3-6x slower).
  return jax.lax.optimization_barrier((exps, jnp.sum(exps, axis=-1, keepdims=True)))


# The softmax is normalised after the AV matmul, as flash attention does, and the
# backward pass is written out: dividing the [B, H, Lq, D] output (and, backward,
# scaling dO) instead of the [B, H, Lq, Lk] weights, and the softmax derivative as
# one fused pass, exps * (dO V^T - rowsum(dO * O)) / sum, save passes over the
# biggest arrays (BENCHMARKS.md). Masked logits have exps of exactly 0, so their
# gradient is 0 without a select.
@jax.custom_vjp
def _masked_attention(q, k, v, q_segment_ids, kv_segment_ids):
  """[B, H, Lq, D] softmax(q k^T, masked) v for heads-first q, k, v (q pre-scaled)."""
  return _masked_attention_fwd(q, k, v, q_segment_ids, kv_segment_ids)[0]


def _masked_attention_fwd(q, k, v, q_segment_ids, kv_segment_ids):
  exps, total = _attention_exps(q, k, q_segment_ids, kv_segment_ids)
  out = jnp.einsum("bhqk,bhkd->bhqd", exps.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
  out = out.astype(q.dtype)
  return out, (q, k, v, exps, total, out)


def _masked_attention_bwd(residuals, d_out):
  q, k, v, exps, total, out = residuals
  d_out = d_out.astype(jnp.float32)
  scaled_d_out = d_out / total  # dO / sum: the normalisation moved onto [Lq, D]
  d_v = jnp.einsum("bhqk,bhqd->bhkd", exps.astype(v.dtype), scaled_d_out.astype(v.dtype),
                   preferred_element_type=jnp.float32)
  d_weights = jnp.einsum("bhqd,bhkd->bhqk", scaled_d_out.astype(v.dtype), v, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(scaled_d_out * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (exps * (d_weights - row_dot)).astype(q.dtype)
  d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q, preferred_element_type=jnp.float32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


def gpu_implementation():
  """The `implementation` the 'gpu' backend gives jax.nn.dot_product_attention here.

  'cudnn' when JAX's default backend is a GPU, 'xla' otherwise (CPU tests and
  TPU run the very same wrapper through XLA's reference path).
  """
  return "cudnn" if jax.default_backend() == "gpu" else "xla"


def _gpu_attention(q, k, v, q_segment_ids, kv_segment_ids):
  """jax.nn.dot_product_attention (layout [B, L, H, D], as ours) with a segment mask.

  cuDNN's flash attention takes the mask as an additive bias, supports fp16 and
  bf16 inputs only and computes its softmax in float32. Queries without keys
  get the kernel's uniform average (the mask is a finite fill): zeroed after.
  """
  implementation = gpu_implementation()
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention backend 'gpu' runs cuDNN flash attention, which needs bfloat16 or float16 "
                     f"inputs, got {q.dtype}: set train.compute_dtype=bfloat16 or model.attention_backend=xla.")
  mask = _segment_mask(q_segment_ids, kv_segment_ids)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def splash_block_size(length):
  """(padded length, tile) of one sequence axis for the splash kernel."""
  padded = -(-length // SPLASH_LENGTH_MULTIPLE) * SPLASH_LENGTH_MULTIPLE
  return padded, next(b for b in SPLASH_BLOCK_SIZES if padded % b == 0)


def _splash_kernel(num_heads, q_len, kv_len, block_q, block_kv, interpret):
  """A splash MHA kernel with a full (all True) static mask on every head: the
  segment ids alone decide who attends to whom. Built while tracing (its mask
  tables become constants of that trace), so it is not cached across traces."""
  # local: the Pallas TPU kernel package (libtpu's backend) stays off the import path off TPU
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len)) for _ in range(num_heads)])
  blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                             block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                             block_q_dq=block_q, block_kv_dq=block_kv)
  return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, interpret):
  """Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention).

  The kernel wants one example's [H, L, D] operands, unscaled logits and
  lengths in whole tiles: q is pre-scaled by 1/sqrt(D), both sequences are
  padded with segment id 0 to `splash_block_size`, the batch is vmapped and the
  padding cut back. Padding queries (id 0) attend to padding keys (id 0) inside
  the kernel, so no kernel row is empty; they are zeroed by the caller.
  """
  # local: the Pallas TPU kernel package (libtpu's backend) stays off the import path off TPU
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  batch, q_len, num_heads, depth = q.shape
  kv_len = k.shape[1]
  q_padded, block_q = splash_block_size(q_len)
  kv_padded, block_kv = splash_block_size(kv_len)

  def pad(x, length):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths)

  q = (q.astype(jnp.float32) / math.sqrt(depth)).astype(q.dtype)
  q, q_ids = pad(q, q_padded), pad(q_segment_ids.astype(jnp.int32), q_padded)
  k, v, kv_ids = pad(k, kv_padded), pad(v, kv_padded), pad(kv_segment_ids.astype(jnp.int32), kv_padded)
  kernel = _splash_kernel(num_heads, q_padded, kv_padded, block_q, block_kv, interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, H, D] <-> [B, H, L, D]

  def one_example(q, k, v, q_ids, kv_ids):
    return kernel(q, k, v, segment_ids=splash.SegmentIds(q=q_ids, kv=kv_ids))

  out = jax.vmap(one_example)(heads_first(q), heads_first(k), heads_first(v), q_ids, kv_ids)
  return heads_first(out)[:, :q_len].astype(q.dtype)


def _splash_sharded(q, k, v, q_segment_ids, kv_segment_ids, *, interpret):
  """Splash under the active mesh: a Pallas kernel has no SPMD partitioning
  rule, so it runs in a shard_map over the logical ('batch', 'length',
  'heads') axes of q. Keys and values enter whole along their length (each
  query shard needs every key of its row), which is the all-gather that
  sequence sharding pays."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, interpret=interpret)
  P = jax.sharding.PartitionSpec

  def dividing(axes, size):  # a dim the mesh axes do not divide (a 1-row init batch) stays whole
    names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    return axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None

  batch_axes, length_axes, heads_axes = nn.logical_to_mesh_axes(("batch", "length", "heads"))
  batch_axes, length_axes, heads_axes = (dividing(batch_axes, q.shape[0]), dividing(length_axes, q.shape[1]),
                                         dividing(heads_axes, q.shape[2]))
  q_spec, kv_spec = P(batch_axes, length_axes, heads_axes, None), P(batch_axes, None, heads_axes, None)
  body = functools.partial(_splash_attention, interpret=interpret)
  return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch_axes, length_axes),
                                                  P(batch_axes, None)),
                       out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def dot_product_attention(q, k, v, q_segment_ids, kv_segment_ids, *, backend="xla"):
  """Scaled dot-product attention restricted to tokens of the same example.

  Self-attention passes the same segment ids twice; cross-attention to text
  passes the text's ids (`text_segment_ids`) as kv_segment_ids, with Lk != Lq.

  Args:
    q: [B, Lq, H, D] queries.
    k, v: [B, Lk, H, D] keys and values.
    q_segment_ids: [B, Lq] int, 0 = padding, k >= 1 = example k of the row.
    kv_segment_ids: [B, Lk] int, same convention.
    backend: one of ATTENTION_BACKENDS: 'xla' (the reference), 'gpu'
      (jax.nn.dot_product_attention; cuDNN on a GPU), 'splash' (Pallas TPU
      splash attention), 'splash_interpret' (splash in the Pallas interpreter).

  Returns:
    [B, Lq, H, D] in q's dtype. A query attends only to keys with its own
    non-zero segment id; a query with no such key (padding, or an example
    without text) gets exactly zeros and no gradient. Every backend computes
    its softmax in float32 and agrees with 'xla' to rounding.
  """
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(f"Unknown attention backend {backend!r}; valid: {ATTENTION_BACKENDS}.")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, L, H, D]; got {q.shape}, {k.shape}, {v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head dim.")
  if q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]:
    raise ValueError(
        f"segment ids {q_segment_ids.shape}, {kv_segment_ids.shape} do not match "
        f"q {q.shape[:2]} and k {k.shape[:2]}.")
  if backend == "xla":
    out = _xla_attention(q, k, v, q_segment_ids, kv_segment_ids)
  elif backend == "gpu":
    out = _gpu_attention(q, k, v, q_segment_ids, kv_segment_ids)
  else:
    out = _splash_sharded(q, k, v, q_segment_ids, kv_segment_ids, interpret=backend == "splash_interpret")
  return _zero_keyless_queries(out, _query_has_key(q_segment_ids, kv_segment_ids))


# ---------------------------------------------------------------------------
# Positional encodings
# ---------------------------------------------------------------------------


def rope_3d_split(head_dim, split=(0.25, 0.375, 0.375)):
  """Number of rotation pairs given to t, h and w.

  Rule: a head of D channels (D even) holds D/2 rotation pairs. h gets
  floor(D/2 * split[1]) pairs, w gets floor(D/2 * split[2]) pairs and t gets the
  rest, so the three counts always sum to D/2 and each axis owns an even number
  (twice its pair count) of channels.
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {head_dim}.")
  if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1.0) > 1e-6:
    raise ValueError(f"RoPE split must be 3 non-negative fractions summing to 1, got {split}.")
  pairs = head_dim // 2
  n_h = int(pairs * split[1])
  n_w = int(pairs * split[2])
  return pairs - n_h - n_w, n_h, n_w


def rope_3d_tables(positions, head_dim, *, split=(0.25, 0.375, 0.375), theta=10000.0):
  """cos and sin of the 3D RoPE angles, each [B, L, 1, D/2] float32 (1: broadcast over heads).

  Computed once per forward and shared by every layer's q and k. Every
  coordinate must be < L (true of packed rows: an example's coordinates lie
  in its grid of at most L tokens); one that is not gives NaN.

  Each axis with n pairs uses its own ladder freqs_i = theta^(-i / n), i < n
  (the 1D RoPE ladder of a 2n-channel head), as in factorised 3D RoPE; the
  D/2 angles are laid out [t pairs | h pairs | w pairs]. `split`: fractions
  of the pairs given to (t, h, w), see `rope_3d_split`.
  """
  if positions.ndim != 3 or positions.shape[-1] != 3:
    raise ValueError(f"RoPE wants positions [B, L, 3], got {positions.shape}.")
  counts = rope_3d_split(head_dim, split)
  cos, sin = [], []
  for axis, n in enumerate(counts):
    if n == 0:
      continue
    freqs = theta ** (-jnp.arange(n, dtype=jnp.float32) / n)
    # cos/sin of every coordinate < L, then a lookup: XLA fuses a lookup into the layers' rotations
    # cheaply, where it would evaluate cos/sin again per head. Out of range gives NaN, never a wrap.
    angles = jnp.arange(positions.shape[1], dtype=jnp.float32)[:, None] * freqs
    cos.append(jnp.take(jnp.cos(angles), positions[..., axis], axis=0, mode="fill"))
    sin.append(jnp.take(jnp.sin(angles), positions[..., axis], axis=0, mode="fill"))
  return jnp.concatenate(cos, axis=-1)[:, :, None, :], jnp.concatenate(sin, axis=-1)[:, :, None, :]


def apply_rope(x, tables):
  """Rotary position embedding of x [B, L, H, D] by `rope_3d_tables` (cos, sin).

  Channels are paired "rotate half" style (GPT-NeoX): pair j is (x[j],
  x[j + D/2]). Computed in float32, returned in x's dtype.
  """
  cos, sin = tables
  if x.ndim != 4 or cos.shape != x.shape[:2] + (1, x.shape[-1] // 2):
    raise ValueError(f"apply_rope wants x [B, L, H, D] and tables [B, L, 1, D/2]; got {x.shape}, {cos.shape}.")
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def sincos_1d_embedding(pos, dim):
  """[..., dim] = [sin(pos * omega), cos(pos * omega)], omega_i = 1/10000^(i/(dim/2)).

  MAE/DiT's get_1d_sincos_pos_embed_from_grid, on float32 positions.
  """
  if dim % 2:
    raise ValueError(f"1D sin-cos embedding needs an even dim, got {dim}.")
  omega = 1.0 / 10000.0 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
  out = pos.astype(jnp.float32)[..., None] * omega
  return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)


def sincos_2d_embedding(positions, dim):
  """Fixed 2D sin-cos embedding of the (h, w) coordinates: [B, L, dim] float32.

  Exactly DiT's get_2d_sincos_pos_embed for a token at (h, w): its meshgrid puts
  w first, so the first dim/2 channels are the 1D embedding of w and the last
  dim/2 that of h, each [sin, cos] with omega_i = 1/10000^(i/(dim/4)). The t
  coordinate is ignored. dim must be a multiple of 4.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}.")
  if positions.shape[-1] != 3:
    raise ValueError(f"positions must end in (t, h, w), got shape {positions.shape}.")
  emb_w = sincos_1d_embedding(positions[..., 2], dim // 2)
  emb_h = sincos_1d_embedding(positions[..., 1], dim // 2)
  return jnp.concatenate([emb_w, emb_h], axis=-1)


def sincos_3d_split(dim):
  """(d_t, d_hw): the 2D (h, w) part gets the multiple of 4 nearest 3/4 of dim."""
  if dim % 4:
    raise ValueError(f"3D sin-cos embedding needs dim divisible by 4, got {dim}.")
  d_hw = 4 * round(0.75 * dim / 4)
  return dim - d_hw, d_hw


def sincos_3d_embedding(positions, dim):
  """Factorised spacetime sin-cos: concat(1D(t) on d_t, 2D(h, w) on d_hw) channels.

  The split is `sincos_3d_split(dim)` (about a quarter for time). The 2D part
  is `sincos_2d_embedding`, so a frame's spatial code is DiT's.
  """
  d_t, d_hw = sincos_3d_split(dim)
  return jnp.concatenate(
      [sincos_1d_embedding(positions[..., 0], d_t), sincos_2d_embedding(positions, d_hw)], axis=-1)


# ---------------------------------------------------------------------------
# Conditioning embedders
# ---------------------------------------------------------------------------


def timestep_frequencies(t, dim=256, max_period=10000.0):
  """DiT/ADM sinusoidal timestep features: [..., dim] = [cos(t f), sin(t f)].

  f_i = max_period^(-i / (dim/2)); an odd dim is padded with one zero.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """DiT's TimestepEmbedder: 256 sinusoidal frequencies -> Dense -> SiLU -> Dense.

  Works on any leading shape (per token here: [B, L] -> [B, L, width]).
  """
  width: int
  frequency_dim: int = 256
  max_period: float = 10000.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    freq = timestep_frequencies(t, self.frequency_dim, self.max_period).astype(self.dtype)
    init = nn.initializers.normal(0.02)
    h = Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=_named(init, ("patch", "mlp")), bias_init=_named(zeros, ("mlp",)),
              name="mlp_0")(freq)
    h = nn.silu(h)
    return Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_named(init, ("mlp", "embed")), bias_init=_named(zeros, ("embed",)),
                 name="mlp_2")(h)


def drop_captions(text, text_segment_ids, drop, null):
  """Caption dropout for classifier-free guidance: every text token of a dropped
  example becomes the learned null vector `null` [Dt] (PixArt's y_embedding), so
  the unconditional model sees a real input, not a missing one.

  text [B, Lt, Dt]; text_segment_ids [B, Lt] (k = example k of the row, 0 =
  padding); drop [B, K] bool per example.
  """
  dropped = jnp.take_along_axis(drop, jnp.maximum(text_segment_ids - 1, 0), axis=1) & (text_segment_ids > 0)
  return jnp.where(dropped[..., None], null.astype(text.dtype), text)


class LabelEmbedder(nn.Module):
  """DiT's LabelEmbedder: a (num_classes + 1) x width table, the last row is the
  null class used for classifier-free guidance.

  `drop_labels` replaces each label by the null class with probability
  `dropout_prob` (DiT's token_drop); call it once per example, before the labels
  are spread over tokens.
  """
  num_classes: int
  width: int
  dropout_prob: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def drop_labels(self, labels, rng):
    drop = jax.random.bernoulli(rng, self.dropout_prob, labels.shape)
    return jnp.where(drop, self.num_classes, labels)

  @nn.compact
  def __call__(self, labels):
    table = nn.Embed(self.num_classes + 1, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=_named(nn.initializers.normal(0.02), ("classes", "embed")),
                     name="embedding_table")
    return table(labels)


# ---------------------------------------------------------------------------
# Transformer layers
# ---------------------------------------------------------------------------


class Mlp(nn.Module):
  """timm Mlp as DiT uses it: Dense(width -> hidden) -> GELU(tanh) -> Dense(-> width)."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=_named(xavier_uniform(), ("embed", "mlp")),
              bias_init=_named(zeros, ("mlp",)), name="fc1")(x)
    h = nn.gelu(h, approximate=True)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_named(xavier_uniform(), ("mlp", "embed")),
                 bias_init=_named(zeros, ("embed",)), name="fc2")(h)


class MultiAxisDense(nn.Module):
  """y = x's trailing axes contracted with kernel's leading axes (tokens_dot), + bias.

  The kernel's trailing axes are the outputs, as many as bias_names has: the per-head
  projections, [width, heads, head_dim] in and [heads, head_dim, width] out, whose heads
  axis can be sharded. (nn.DenseGeneral's initialiser reshapes a flattened kernel and so
  trips over its own logical sharding constraint when a mesh is active.)
  """
  kernel_shape: Sequence[int]
  kernel_names: Sequence[str]
  kernel_init: Any
  bias_names: Sequence[str]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    num_outputs = len(self.bias_names)
    kernel = self.param("kernel", _named(self.kernel_init, tuple(self.kernel_names)), tuple(self.kernel_shape),
                        self.param_dtype)
    bias = self.param("bias", _named(zeros, tuple(self.bias_names)), tuple(self.kernel_shape[-num_outputs:]),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return tokens_dot(x, kernel, len(self.kernel_shape) - num_outputs) + bias


class SelfAttention(nn.Module):
  """Multi-head self-attention over packed rows (timm Attention as in DiT).

  q, k and v are separate [width, heads, head_dim] projections (so 'heads' can
  be sharded). DiT fuses them into one width x 3*width xavier_uniform matrix;
  `variance_scaling(0.5, 'fan_avg', 'uniform')` on each third draws from the
  very same distribution (fan_avg of the fused matrix is 2*width).

  Optional QK-norm (LayerNorm over head_dim, as timm's qk_norm), and RoPE on q
  and k when called with `rope` tables (`rope_3d_tables`, computed once by the
  caller for all layers). `backend` is one of ATTENTION_BACKENDS.

  Sequence parallelism: with a rule ('length', <mesh axis>) the queries stay
  split along the sequence and K/V are all-gathered (see __call__), so the
  result equals the unsharded one.
  """
  num_heads: int
  qk_norm: bool = False
  backend: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, segment_ids, rope=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
    head_dim = width // self.num_heads
    qkv_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))

    def project(name):
      y = MultiAxisDense((width, self.num_heads, head_dim), ("embed", "heads", "kv"), qkv_init,
                         ("heads", "kv"), dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    q, k, v = project("query"), project("key"), project("value")
    if self.qk_norm:
      norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                                       scale_init=_named(nn.initializers.ones_init(), ("kv",)),
                                       bias_init=_named(zeros, ("kv",)), name=name)
      q, k = norm("q_norm")(q), norm("k_norm")(k)
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    # Sequence sharding stays exact: where the rules split 'length' over a mesh
    # axis, q (and the output) stay split, but every query shard needs all keys
    # of its row, so K and V are constrained whole along length (None): the
    # compiler all-gathers them. A no-op when 'length' is not sharded.
    k = nn.with_logical_constraint(k, ("batch", None, "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", None, "heads", "kv"))
    out = dot_product_attention(q, k, v, segment_ids, segment_ids, backend=self.backend)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    proj_init = xavier_uniform(in_axis=(0, 1), out_axis=2)
    return MultiAxisDense((self.num_heads, head_dim, width), ("heads", "kv", "embed"), proj_init,
                          ("embed",), dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)
