"""Tests of diffusion_jax/models/layers.py at tiny sizes."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import layers


def _naive_attention(q, k, v, seg):
  """Per example, per head softmax(q k^T / sqrt(D)) v in float64; zeros for padding."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  seg = np.asarray(seg)
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for i in range(q.shape[1]):
      if seg[b, i] == 0:
        continue
      keys = np.nonzero(seg[b] == seg[b, i])[0]
      for h in range(q.shape[2]):
        logits = k[b, keys, h] @ q[b, i, h] / math.sqrt(q.shape[-1])
        w = np.exp(logits - logits.max())
        out[b, i, h] = (w / w.sum()) @ v[b, keys, h]
  return out


def _qkv(key, shape):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, shape), jax.random.normal(kk, shape), jax.random.normal(kv, shape))


def test_attention_matches_per_example_softmax():
  q, k, v = _qkv(jax.random.key(0), (2, 7, 2, 4))
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 0]], jnp.int32)
  out = layers.dot_product_attention(q, k, v, seg, seg)
  np.testing.assert_allclose(out, _naive_attention(q, k, v, seg), atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0.0)


def test_attention_fully_padded_row_is_zero_with_finite_grads():
  q, k, v = _qkv(jax.random.key(1), (2, 5, 2, 4))
  seg = jnp.array([[0, 0, 0, 0, 0], [1, 1, 2, 0, 0]], jnp.int32)

  def loss(q, k, v):
    out = layers.dot_product_attention(q, k, v, seg, seg)
    return jnp.sum(out**2) + jnp.sum(out), out

  grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  assert np.all(np.asarray(out[0]) == 0.0)
  assert np.all(np.isfinite(np.asarray(out)))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g[0]) == 0.0)  # nothing in the padded row gets gradient
  assert np.abs(np.asarray(grads[2][1])).max() > 0  # the real row does


def test_attention_bfloat16_inputs_use_float32_softmax():
  q, k, v = _qkv(jax.random.key(2), (1, 6, 2, 8))
  seg = jnp.array([[1, 1, 1, 1, 2, 2]], jnp.int32)
  out = layers.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg, seg)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _naive_attention(q, k, v, seg), atol=5e-2)


def test_attention_rejects_bad_input():
  q, k, v = _qkv(jax.random.key(3), (1, 4, 2, 4))
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"Unknown attention backend 'flash9000'; valid: \('xla', 'gpu', 'splash', "):
    layers.dot_product_attention(q, k, v, seg, seg, backend="flash9000")
  with pytest.raises(ValueError, match="segment ids"):
    layers.dot_product_attention(q, k, v, seg[:, :3], seg)
  with pytest.raises(ValueError, match="disagree"):
    layers.dot_product_attention(q, k[..., :2], v[..., :2], seg, seg)


# Packed rows for the backend comparisons: several examples of different
# lengths, trailing padding, and (cross-attention) text of other lengths where
# example 3 of row 0 has no text at all, so its queries have no key.
_Q_SEGMENTS = np.array([[1] * 9 + [2] * 14 + [3] * 6 + [0] * 4,
                        [1] * 20 + [2] * 13])
_TEXT_SEGMENTS = np.array([[1] * 3 + [2] * 5 + [0] * 3,
                           [2] * 4 + [1] * 6 + [0]])
# What each backend runs here: 'splash' itself needs a TPU.
_CPU_BACKENDS = ("gpu", "splash_interpret")


def _backend_fn(backend, q_ids, kv_ids):
  """jit(value and grads) of a nonlinear function of the attention output."""
  def loss(q, k, v):
    out = layers.dot_product_attention(q, k, v, q_ids, kv_ids, backend=backend)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)) * jnp.arange(out.shape[-1])), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def test_backend_names():
  assert layers.ATTENTION_BACKENDS == ("xla", "gpu", "splash", "splash_interpret")
  assert layers.gpu_implementation() == "xla"  # cuDNN on a GPU only
  assert layers.splash_block_size(33) == (128, 128)
  assert layers.splash_block_size(640) == (640, 128)
  assert layers.splash_block_size(1000) == (1024, 512)
  assert layers.splash_block_size(768) == (768, 256)


@pytest.mark.parametrize("backend", _CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_backends_agree_with_xla_on_packed_rows(backend, kind):
  """Outputs and all three gradients equal the reference (float32, to rounding);
  padding and queries without keys are exactly zero in every backend."""
  q_ids = jnp.asarray(_Q_SEGMENTS, jnp.int32)
  kv_ids = q_ids if kind == "self" else jnp.asarray(_TEXT_SEGMENTS, jnp.int32)
  q, _, _ = _qkv(jax.random.key(10), q_ids.shape + (2, 8))
  _, k, v = _qkv(jax.random.key(11), kv_ids.shape + (2, 8))
  (value, out), grads = _backend_fn(backend, q_ids, kv_ids)(q, k, v)
  (ref_value, ref_out), ref_grads = _backend_fn("xla", q_ids, kv_ids)(q, k, v)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
  keyless = np.array([[qi == 0 or qi not in kv_row for qi in q_row]
                      for q_row, kv_row in zip(np.asarray(q_ids).tolist(), np.asarray(kv_ids).tolist())])
  assert keyless.sum() == (4 if kind == "self" else 4 + 6)  # the padding (+ example 3 of row 0, without text)
  assert np.all(np.asarray(out)[keyless] == 0.0) and np.all(np.asarray(grads[0])[keyless] == 0.0)
  assert np.abs(np.asarray(out)[~keyless]).min() > 0


def _naive_attention_cross(q, k, v, q_ids, kv_ids):
  """float64 per-query softmax over the keys of its own segment (zeros if none)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for i in range(q.shape[1]):
      keys = np.nonzero((kv_ids[b] == q_ids[b, i]) & (q_ids[b, i] != 0))[0]
      if len(keys) == 0:
        continue
      logits = np.einsum("khd,hd->hk", k[b, keys], q[b, i]) / math.sqrt(q.shape[-1])
      w = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, i] = np.einsum("hk,khd->hd", w / w.sum(-1, keepdims=True), v[b, keys])
  return out


def test_xla_attention_hand_written_gradients_equal_autodiff():
  """The 'xla' backend's backward pass is written out (normalised after AV); its
  gradients equal autodiff through a plain masked softmax, self and cross."""
  def plain(q, k, v, q_ids, kv_ids):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    mask = layers._segment_mask(q_ids, kv_ids)
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return layers._zero_keyless_queries(out, layers._query_has_key(q_ids, kv_ids))

  for kv_segments in (_Q_SEGMENTS, _TEXT_SEGMENTS):
    q_ids, kv_ids = jnp.asarray(_Q_SEGMENTS, jnp.int32), jnp.asarray(kv_segments, jnp.int32)
    q, _, _ = _qkv(jax.random.key(15), q_ids.shape + (2, 8))
    _, k, v = _qkv(jax.random.key(16), kv_ids.shape + (2, 8))
    w = jax.random.normal(jax.random.key(17), q.shape)
    grads = [jax.grad(lambda q, k, v: jnp.sum(w * jnp.tanh(f(q, k, v, q_ids, kv_ids))), argnums=(0, 1, 2))(q, k, v)
             for f in (lambda *a: layers.dot_product_attention(*a), plain)]
    for g, ref in zip(*grads):
      np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
      assert np.abs(np.asarray(ref)).max() > 1e-3


def test_cross_attention_reference_matches_naive():
  q_ids, kv_ids = jnp.asarray(_Q_SEGMENTS, jnp.int32), jnp.asarray(_TEXT_SEGMENTS, jnp.int32)
  q, _, _ = _qkv(jax.random.key(12), q_ids.shape + (2, 4))
  _, k, v = _qkv(jax.random.key(13), kv_ids.shape + (2, 4))
  out = layers.dot_product_attention(q, k, v, q_ids, kv_ids)
  np.testing.assert_allclose(out, _naive_attention_cross(q, k, v, q_ids, kv_ids), atol=1e-5)


def test_gpu_backend_bfloat16_matches_reference():
  q_ids = jnp.asarray(_Q_SEGMENTS, jnp.int32)
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(jax.random.key(14), q_ids.shape + (2, 8)))
  out = layers.dot_product_attention(q, k, v, q_ids, q_ids, backend="gpu")
  ref = layers.dot_product_attention(q, k, v, q_ids, q_ids, backend="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def test_query_has_key_without_the_full_mask():
  q_ids = jnp.asarray(_Q_SEGMENTS, jnp.int32)
  kv_ids = jnp.asarray(_TEXT_SEGMENTS, jnp.int32)
  expected = np.asarray(layers._segment_mask(q_ids, kv_ids)).any(axis=(1, 3))
  np.testing.assert_array_equal(layers._query_has_key(q_ids, kv_ids), expected)
  np.testing.assert_array_equal(layers._query_has_key(q_ids, q_ids), np.asarray(q_ids) != 0)


def test_self_attention_module_runs_every_cpu_backend_alike():
  width, heads = 16, 2
  x = jax.random.normal(jax.random.key(15), (2, 12, width))
  seg = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12], jnp.int32)
  pos = jnp.zeros((2, 12, 3), jnp.int32).at[..., 2].set(jnp.arange(12) % 5)
  rope = layers.rope_3d_tables(pos, width // heads)
  module = layers.SelfAttention(heads)
  params = module.init(jax.random.key(16), x, seg, rope)
  ref = module.apply(params, x, seg, rope)
  for backend in _CPU_BACKENDS:
    out = jax.jit(module.clone(backend=backend).apply)(params, x, seg, rope)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_rope_split_rule():
  assert layers.rope_3d_split(16) == (2, 3, 3)
  assert layers.rope_3d_split(64) == (8, 12, 12)
  assert layers.rope_3d_split(72, split=(0.0, 0.5, 0.5)) == (0, 18, 18)
  with pytest.raises(ValueError, match="even"):
    layers.rope_3d_split(15)
  with pytest.raises(ValueError, match="sum"):
    layers.rope_3d_split(16, split=(0.5, 0.5, 0.5))


def test_rope_is_a_rotation_that_depends_on_relative_position():
  key_q, key_k, key_p = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(key_q, (1, 30, 2, 16))  # coordinates (< 27 below) must be < L
  k = jax.random.normal(key_k, (1, 30, 2, 16))
  pos = jax.random.randint(key_p, (1, 30, 3), 0, 20)
  rotate = lambda x, pos: layers.apply_rope(x, layers.rope_3d_tables(pos, x.shape[-1]))
  rq, rk = rotate(q, pos), rotate(k, pos)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(rotate(q, jnp.zeros_like(pos)), q, atol=1e-6)
  logits = jnp.einsum("bqhd,bkhd->bhqk", rq, rk)
  for shift in ([3, 0, 0], [0, 5, 0], [0, 0, 7]):
    moved = pos + jnp.array(shift, jnp.int32)
    moved_logits = jnp.einsum("bqhd,bkhd->bhqk", rotate(q, moved), rotate(k, moved))
    np.testing.assert_allclose(moved_logits, logits, atol=1e-4)
  # The tables equal cos/sin of position x frequency; a coordinate >= L is NaN, not wrapped.
  cos, sin = layers.rope_3d_tables(pos, 16)
  freqs = [10000.0 ** (-np.arange(n) / n) for n in layers.rope_3d_split(16)]
  angles = np.concatenate([np.asarray(pos[..., a:a + 1], np.float32) * f for a, f in enumerate(freqs)], -1)
  np.testing.assert_allclose(cos[:, :, 0], np.cos(angles), atol=1e-5)
  np.testing.assert_allclose(sin[:, :, 0], np.sin(angles), atol=1e-5)
  assert np.isnan(np.asarray(layers.rope_3d_tables(pos.at[0, 3, 1].set(30), 16)[0][0, 3])).any()
  # Every axis is actually encoded: moving one token along any axis changes its logits.
  for axis in range(3):
    moved = pos.at[0, 0, axis].add(1)
    moved_logits = jnp.einsum("bqhd,bkhd->bhqk", rotate(q, moved), rotate(k, moved))
    assert np.abs(np.asarray(moved_logits - logits)[:, :, 0, 1:]).max() > 1e-3


def _dit_2d_sincos_numpy(embed_dim, grid_h, grid_w):
  """DiT's get_2d_sincos_pos_embed (MAE), for an h x w grid, flattened row-major."""
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))  # w first
  grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)
  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_2d_matches_dit():
  h, w, dim = 3, 5, 32
  hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  pos = np.stack([np.zeros_like(hh), hh, ww], -1).reshape(1, h * w, 3)
  ours = layers.sincos_2d_embedding(jnp.asarray(pos, jnp.int32), dim)
  np.testing.assert_allclose(ours[0], _dit_2d_sincos_numpy(dim, h, w), atol=1e-5)
  with pytest.raises(ValueError, match="divisible by 4"):
    layers.sincos_2d_embedding(jnp.asarray(pos), 30)


def test_sincos_3d_is_time_code_then_dit_spatial_code():
  pos = jnp.array([[[0, 1, 2], [4, 1, 2], [4, 0, 3]]], jnp.int32)
  emb = layers.sincos_3d_embedding(pos, 32)
  d_t, d_hw = layers.sincos_3d_split(32)
  assert (d_t, d_hw) == (8, 24)
  np.testing.assert_allclose(emb[..., d_t:], layers.sincos_2d_embedding(pos, d_hw), atol=1e-6)
  np.testing.assert_allclose(emb[0, 0, d_t:], emb[0, 1, d_t:])  # same (h, w), other frame
  assert np.abs(np.asarray(emb[0, 0, :d_t] - emb[0, 1, :d_t])).max() > 0.1


def test_timestep_frequencies_match_dit_formula():
  t = jnp.array([[0.0, 1.0, 999.0]])
  emb = np.asarray(layers.timestep_frequencies(t, 256))
  half = 128
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = np.array([0.0, 1.0, 999.0])[:, None] * freqs
  np.testing.assert_allclose(emb[0], np.concatenate([np.cos(args), np.sin(args)], -1), atol=2e-4)
  assert layers.timestep_frequencies(t, 7).shape == (1, 3, 7)


def test_embedders_and_attention_init_like_dit():
  width, heads = 64, 4
  x = jnp.ones((1, 3, width))
  seg = jnp.ones((1, 3), jnp.int32)
  attn = nn.unbox(layers.SelfAttention(heads).init(jax.random.key(0), x, seg))["params"]
  fused = jnp.concatenate([attn[n]["kernel"].reshape(width, width) for n in ("query", "key", "value")], axis=1)
  limit = math.sqrt(6.0 / (width + 3 * width))  # xavier_uniform of DiT's fused [width, 3 width] qkv
  assert float(jnp.abs(fused).max()) <= limit and float(jnp.abs(fused).max()) > 0.95 * limit
  np.testing.assert_allclose(float(jnp.std(fused)), limit / math.sqrt(3), rtol=0.05)
  assert float(jnp.abs(attn["query"]["bias"]).max()) == 0.0

  temb = nn.unbox(layers.TimestepEmbedder(width).init(jax.random.key(1), jnp.zeros((1, 3))))["params"]
  assert temb["mlp_0"]["kernel"].shape == (256, width)
  np.testing.assert_allclose(float(jnp.std(temb["mlp_0"]["kernel"])), 0.02, rtol=0.05)
  labels = layers.LabelEmbedder(10, width)
  lemb = nn.unbox(labels.init(jax.random.key(2), jnp.zeros((1, 3), jnp.int32)))["params"]
  assert lemb["embedding_table"]["embedding"].shape == (11, width)  # + the null class row
  dropped = labels.drop_labels(jnp.arange(10), jax.random.key(3))
  assert set(np.asarray(dropped).tolist()) <= set(range(11))
  assert np.all(np.asarray(labels.clone(dropout_prob=1.0).drop_labels(jnp.arange(10), jax.random.key(3))) == 10)


def test_self_attention_keeps_examples_apart():
  width, heads = 16, 2
  x = jax.random.normal(jax.random.key(5), (1, 6, width))
  seg = jnp.array([[1, 1, 1, 2, 2, 0]], jnp.int32)
  pos = jnp.array([[[0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]], jnp.int32)
  for qk_norm, rope in ((False, False), (True, True)):
    module = layers.SelfAttention(heads, qk_norm=qk_norm)
    tables = (lambda p: layers.rope_3d_tables(p, width // heads)) if rope else (lambda p: None)
    params = jax.jit(module.init)(jax.random.key(6), x, seg, tables(pos))
    apply = jax.jit(module.apply)
    both = apply(params, x, seg, tables(pos))
    first = apply(params, x[:, :3], seg[:, :3], tables(pos[:, :3]))
    second = apply(params, x[:, 3:5], seg[:, 3:5] - 1, tables(pos[:, 3:5]))
    np.testing.assert_allclose(both[:, :3], first, atol=1e-5)
    np.testing.assert_allclose(both[:, 3:5], second, atol=1e-5)


def test_tokens_dot_is_the_dense_contraction_on_every_target():
  """tokens_dot equals the einsum it replaces (values and gradients); a CPU program gets the 2-D
  matmul (no transposing copies for the weight gradient), a TPU program the plain contraction."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 4, 8)), jnp.float32)
  for kernel_shape, equation, n in [((8, 6), "blhk,kf->blhf", 1), ((4, 8, 6), "blhk,hkf->blf", 2)]:
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    expected = jnp.einsum(equation, x, kernel, precision="highest")
    np.testing.assert_allclose(layers.tokens_dot(x, kernel, n, precision="highest"), expected, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
    got = jax.grad(loss(lambda x, k: layers.tokens_dot(x, k, n, precision="highest")), argnums=(0, 1))(x, kernel)
    want = jax.grad(loss(lambda x, k: jnp.einsum(equation, x, k, precision="highest")), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)

  hlo = jax.jit(lambda x, k: layers.tokens_dot(x, k, 2)).lower(x, kernel).as_text()
  assert "tensor<15x32xf32>" in hlo  # 3 x 5 rows, 4 x 8 contracted: one 2-D matmul on CPU
  with pytest.raises(ValueError, match="a Dense's contraction only"):
    layers._tokens_dot_general(x, kernel, (((0,), (0,)), ((), ())))

  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    tpu = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as error:  # no libtpu: nothing describes a TPU here
    pytest.skip(f"no TPU topology: {error}")
  mesh = jax.sharding.Mesh(np.array(tpu.devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert layers._target_platform() == "tpu"
    hlo = jax.jit(lambda x, k: layers.tokens_dot(x, k, 2)).trace(
        jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)).lower(
            lowering_platforms=("tpu",)).as_text()
  assert "tensor<15x32xf32>" not in hlo and "dot_general" in hlo
