"""Tests of diffusion_jax/models/dit.py at tiny sizes (the XL count uses eval_shape only)."""
import importlib.util
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import dit

PATCH, CHANNELS = 2, 3
P = PATCH * PATCH * CHANNELS
SMOKE = dict(patch_dim=P, width=32, depth=2, num_heads=2, num_classes=10)
LOGICAL_NAMES = {"batch", "length", "embed", "mlp", "heads", "kv", "patch", "classes", "layers", "modulation"}


# ---------------------------------------------------------------------------
# Helpers: patchify, pack, random params
# ---------------------------------------------------------------------------


def _patchify(img, patch=PATCH):
  """[H, W, C] -> [h*w, patch*patch*C], patches row-major, each in (ph, pw, C) order."""
  H, W, C = img.shape
  h, w = H // patch, W // patch
  return img.reshape(h, patch, w, patch, C).transpose(0, 2, 1, 3, 4).reshape(h * w, patch * patch * C)


def _grid_positions(frames, h, w):
  tt, hh, ww = np.meshgrid(np.arange(frames), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([tt, hh, ww], -1).reshape(-1, 3)


def _example(key, frames, h, w, t, label):
  return dict(x=np.asarray(jax.random.normal(key, (frames * h * w, P))), pos=_grid_positions(frames, h, w),
              t=t, label=label)


def _pack(rows, length, num_slots):
  """Rows of examples -> the packed batch (x, t, labels, segment_ids, positions); padding is zeros."""
  B = len(rows)
  x = np.zeros((B, length, P), np.float32)
  t = np.zeros((B, length), np.float32)
  labels = np.zeros((B, num_slots), np.int32)
  seg = np.zeros((B, length), np.int32)
  pos = np.zeros((B, length, 3), np.int32)
  for b, row in enumerate(rows):
    start = 0
    for k, ex in enumerate(row):
      n = len(ex["x"])
      x[b, start:start + n] = ex["x"]
      t[b, start:start + n] = ex["t"]
      pos[b, start:start + n] = ex["pos"]
      seg[b, start:start + n] = k + 1
      labels[b, k] = ex["label"]
      start += n
  return tuple(jnp.asarray(a) for a in (x, t, labels, seg, pos))


def _randomize(params, key, scale=0.15):
  """Every parameter drawn afresh (so adaLN gates and the final layer are non-zero)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _init(model, batch, seed=0):
  return nn.unbox(jax.jit(model.init)(jax.random.key(seed), *batch)["params"])


def _apply(model):
  return jax.jit(lambda params, batch: model.apply({"params": params}, *batch))


def _layer(params, i, scanned):
  return jax.tree.map(lambda a: a[i], params["blocks"]) if scanned else params[f"blocks_{i}"]


def _stack_layers(unrolled, depth):
  scanned = {k: v for k, v in unrolled.items() if not k.startswith("blocks_")}
  scanned["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *[unrolled[f"blocks_{i}"] for i in range(depth)])
  return scanned


def _load_image_config(arg=""):
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "dit_image.py")
  spec = importlib.util.spec_from_file_location("dit_image_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ---------------------------------------------------------------------------
# An independent DiT forward (DiT's models.py, one unpacked image, numpy float64)
# ---------------------------------------------------------------------------


def _dit_pos_embed(dim, grid_h, grid_w):
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.stack(np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64)), 0)
  return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def _reference_dit(params, img, t, y, *, num_heads, depth, scanned):
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  H, W, C = img.shape
  h, w = H // PATCH, W // PATCH
  width = p64["x_embedder"]["kernel"].shape[1]
  head_dim = width // num_heads
  silu = lambda a: a / (1 + np.exp(-a))
  gelu_tanh = lambda a: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))

  def layer_norm(a):  # LayerNorm(elementwise_affine=False, eps=1e-6)
    mu = a.mean(-1, keepdims=True)
    return (a - mu) / np.sqrt(((a - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

  def linear(a, p, in_dim, out_dim):
    return a @ p["kernel"].reshape(in_dim, out_dim) + p["bias"].reshape(out_dim)

  # PatchEmbed: Conv2d(C, width, kernel=stride=PATCH); its weight is our kernel seen as [ph, pw, C, width].
  conv = p64["x_embedder"]["kernel"].reshape(PATCH, PATCH, C, width)
  x = np.einsum("ipjqc,pqcd->ijd", np.asarray(img, np.float64).reshape(h, PATCH, w, PATCH, C), conv)
  x = (x + p64["x_embedder"]["bias"]).reshape(h * w, width) + _dit_pos_embed(width, h, w)
  # TimestepEmbedder and LabelEmbedder.
  # DiT forms t * freqs in float32 (torch's default dtype); so do we, then go on in float64.
  freqs = np.exp(-math.log(10000) * np.arange(128, dtype=np.float32) / 128).astype(np.float32)
  args = (np.float32(t) * freqs).astype(np.float64)
  t_freq = np.concatenate([np.cos(args), np.sin(args)])
  te = p64["t_embedder"]
  t_emb = linear(silu(linear(t_freq, te["mlp_0"], 256, width)), te["mlp_2"], width, width)
  c = t_emb + p64["y_embedder"]["embedding_table"]["embedding"][y]

  for i in range(depth):
    blk = _layer(p64, i, scanned)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(
        linear(silu(c), blk["adaLN_modulation"], width, 6 * width), 6)
    # timm Attention with a fused qkv Linear(width, 3 width).
    a = blk["attn"]
    w_qkv = np.concatenate([a[n]["kernel"].reshape(width, width) for n in ("query", "key", "value")], 1)
    b_qkv = np.concatenate([a[n]["bias"].reshape(width) for n in ("query", "key", "value")])
    hin = layer_norm(x) * (1 + scale_msa) + shift_msa
    qkv = (hin @ w_qkv + b_qkv).reshape(h * w, 3, num_heads, head_dim).transpose(1, 2, 0, 3)
    q, k, v = qkv
    logits = q @ k.transpose(0, 2, 1) * head_dim**-0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = (attn @ v).transpose(1, 0, 2).reshape(h * w, width)
    x = x + gate_msa * linear(o, a["proj"], width, width)
    hin = layer_norm(x) * (1 + scale_mlp) + shift_mlp
    hidden = blk["mlp"]["fc1"]["kernel"].shape[-1]
    x = x + gate_mlp * linear(gelu_tanh(linear(hin, blk["mlp"]["fc1"], width, hidden)), blk["mlp"]["fc2"], hidden,
                              width)
  fl = p64["final_layer"]
  shift, scale = np.split(linear(silu(c), fl["adaLN_modulation"], width, 2 * width), 2)
  out_dim = fl["linear"]["kernel"].shape[-1]
  return linear(layer_norm(x) * (1 + scale) + shift, fl["linear"], width, out_dim)


def test_matches_independent_dit_forward_on_unpacked_images():
  model = dit.DiT(**SMOKE)
  img_a = np.asarray(jax.random.normal(jax.random.key(1), (8, 8, CHANNELS)))  # 4x4 grid
  img_b = np.asarray(jax.random.normal(jax.random.key(2), (6, 10, CHANNELS)))  # 3x5 grid, one padding token
  rows = [[dict(x=_patchify(img_a), pos=_grid_positions(1, 4, 4), t=417.0, label=3)],
          [dict(x=_patchify(img_b), pos=_grid_positions(1, 3, 5), t=12.0, label=8)]]
  batch = _pack(rows, 16, 1)
  # Scale 0.1 keeps attention logits moderate, so float32 rounding stays below 1e-5.
  params = _randomize(_init(model, batch), jax.random.key(3), scale=0.1)
  out = _apply(model)(params, batch)
  assert out.shape == (2, 16, 2 * P) and out.dtype == jnp.float32
  kw = dict(num_heads=2, depth=2, scanned=True)
  np.testing.assert_allclose(out[0], _reference_dit(params, img_a, 417.0, 3, **kw), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[1, :15], _reference_dit(params, img_b, 12.0, 8, **kw), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Layouts: scan vs loop, remat
# ---------------------------------------------------------------------------


def _small_batch(seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  rows = [[_example(keys[0], 1, 3, 3, 250.0, 1), _example(keys[1], 2, 2, 1, 40.0, 10)]]
  return _pack(rows, 16, 2)


def test_scan_and_unrolled_compute_the_same_function():
  batch = _small_batch()
  unrolled_model = dit.DiT(**SMOKE, scan_layers=False, pos_embedding="rope3d")
  unrolled = _randomize(_init(unrolled_model, batch), jax.random.key(4))
  scanned_model = unrolled_model.clone(scan_layers=True)
  scanned = _stack_layers(unrolled, SMOKE["depth"])
  # The stacked tree has exactly the scanned model's structure and shapes.
  expected = jax.eval_shape(lambda: _init(scanned_model, batch))
  assert jax.tree.structure(expected) == jax.tree.structure(scanned)
  assert jax.tree.map(lambda a: a.shape, expected) == jax.tree.map(lambda a: a.shape, scanned)
  np.testing.assert_allclose(_apply(scanned_model)(scanned, batch), _apply(unrolled_model)(unrolled, batch),
                             atol=1e-6)


def _unstack_layers(scanned, depth):
  unrolled = {k: v for k, v in scanned.items() if k != "blocks"}
  unrolled.update({f"blocks_{i}": _layer(scanned, i, True) for i in range(depth)})
  return unrolled


def test_remat_keeps_values_and_gradients():
  batch = _small_batch(1)
  base = dit.DiT(**SMOKE)
  params = _randomize(_init(base, batch), jax.random.key(5))

  def value_and_grad(model, params):
    loss = lambda p: jnp.mean(model.apply({"params": p}, *batch) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  v0, g0 = value_and_grad(base, params)
  v1, g1 = value_and_grad(base.clone(remat="full"), params)
  v2, g2 = value_and_grad(base.clone(remat="dots", scan_layers=False), _unstack_layers(params, SMOKE["depth"]))
  g2 = _stack_layers(g2, SMOKE["depth"])
  for v, g in ((v1, g1), (v2, g2)):
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g, g0)


def _largest_fusion_operands(compiled_hlo):
  bodies = re.findall(r"\n%[\w.\-]+ \(.*?\) -> .*? \{\n(.*?)\n\}\n", compiled_hlo, re.S)
  return max(body.count(" parameter(") for body in bodies)


def test_written_out_residual_grads_keep_gradients_and_stop_re_fusing_the_chain():
  batch = _small_batch(1)
  base = dit.DiT(**dict(SMOKE, depth=8), scan_layers=True, scan_unroll=8)
  params = _randomize(_init(base, batch), jax.random.key(6))

  def compiled_value_and_grad(model):
    loss = lambda p: jnp.mean(model.apply({"params": p}, *batch) ** 2)
    return jax.jit(jax.value_and_grad(loss)).lower(params).compile()

  plain, written = compiled_value_and_grad(base), compiled_value_and_grad(base.clone(write_out_residual_grads=True))
  v0, g0 = plain(params)
  v1, g1 = written(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)
  if jax.default_backend() == "cpu":  # the XLA CPU fusion it works around: ~20 operands a block, all in one
    written_operands = _largest_fusion_operands(written.as_text())
    plain_operands = _largest_fusion_operands(plain.as_text())
    assert 2 * written_operands < plain_operands, (written_operands, plain_operands)


def test_build_dit_writes_out_residual_grads_only_for_unrolled_blocks_on_cpu():
  config = dict(variant="smoke", num_classes=10)
  on_cpu = jax.default_backend() == "cpu"
  assert dit.build_dit(dict(config, scan_unroll=0), patch_dim=P).write_out_residual_grads == on_cpu
  assert dit.build_dit(dict(config, scan_layers=False), patch_dim=P).write_out_residual_grads == on_cpu
  assert not dit.build_dit(dict(config, scan_unroll=1), patch_dim=P).write_out_residual_grads


# ---------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pos_embedding", ["sincos2d", "rope3d"])
def test_packed_examples_are_isolated(pos_embedding):
  keys = jax.random.split(jax.random.key(6), 2)
  a = _example(keys[0], 1, 3, 4, 300.0, 3)  # a 3x4 image
  b = _example(keys[1], 2, 2, 2, 50.0, 7)  # a 2-frame 2x2 clip
  b["t"] = np.array([0.0] * 4 + [50.0] * 4)  # first frame as a clean conditioning frame
  model = dit.DiT(**SMOKE, pos_embedding=pos_embedding)
  batch = _pack([[a, b], [a], [b]], 24, 3)
  params = _randomize(_init(model, batch), jax.random.key(7))
  apply = _apply(model)
  out = np.asarray(apply(params, batch))
  np.testing.assert_allclose(out[0, :12], out[1, :12], atol=1e-5)  # a, packed vs alone
  np.testing.assert_allclose(out[0, 12:20], out[2, :8], atol=1e-5)  # b, packed vs alone
  assert np.abs(out[0, :12] - out[0, 12:20].mean()).max() > 1e-3  # outputs are not trivially equal

  # Garbage in padding tokens and unused label slots changes no real token.
  x, t, labels, seg, pos = (np.array(v) for v in batch)
  pad = seg == 0
  rng = np.random.default_rng(0)
  x[pad] = 10 * rng.normal(size=x[pad].shape)
  t[pad] = 999.0
  pos[pad] = rng.integers(0, 50, size=pos[pad].shape)
  labels[:, 2] = 9
  labels[1:, 1] = 5
  noisy = np.asarray(apply(params, tuple(jnp.asarray(v) for v in (x, t, labels, seg, pos))))
  np.testing.assert_allclose(noisy[~pad], out[~pad], atol=1e-6)
  assert np.all(np.isfinite(noisy))


def test_fully_padded_row_is_finite_with_finite_gradients():
  keys = jax.random.split(jax.random.key(8), 1)
  batch = _pack([[_example(keys[0], 1, 2, 3, 10.0, 2)], []], 8, 1)
  model = dit.DiT(**SMOKE)
  params = _randomize(_init(model, batch), jax.random.key(9))
  mask = (batch[3] > 0)[..., None]
  loss = lambda p: jnp.sum(jnp.where(mask, model.apply({"params": p}, *batch), 0.0) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value) and value > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.all(np.isfinite(_apply(model)(params, batch)))


def test_label_dropout_is_per_example():
  keys = jax.random.split(jax.random.key(10), 8)
  examples = [_example(k, 1, 1, 2, 100.0, i) for i, k in enumerate(keys)]  # 8 examples of 2 tokens
  model = dit.DiT(**SMOKE, class_dropout_prob=0.5)
  batch = _pack([examples], 16, 8)
  params = _randomize(_init(model, batch), jax.random.key(11))
  x, t, labels, seg, pos = batch
  cond = np.asarray(_apply(model)(params, batch))
  null = np.asarray(_apply(model)(params, (x, t, jnp.full_like(labels, 10), seg, pos)))
  dropped = np.asarray(jax.jit(lambda p, rng: model.apply({"params": p}, *batch, train=True, rngs={"dropout": rng}))(
      params, jax.random.key(0)))
  kinds = []
  for k in range(8):
    tokens = dropped[0, 2 * k:2 * k + 2]
    is_cond = np.allclose(tokens, cond[0, 2 * k:2 * k + 2], atol=1e-6)
    is_null = np.allclose(tokens, null[0, 2 * k:2 * k + 2], atol=1e-6)
    assert is_cond != is_null, f"example {k}: tokens must all be conditional or all null"
    kinds.append(is_cond)
  assert any(kinds) and not all(kinds)


# ---------------------------------------------------------------------------
# Initialisation, sizes, config
# ---------------------------------------------------------------------------


def test_zero_init_output_is_exactly_zero_but_trainable():
  batch = _small_batch(2)
  for pos_embedding in ("sincos2d", "rope3d"):
    model = dit.DiT(**SMOKE, pos_embedding=pos_embedding)
    params = _init(model, batch)
    out = _apply(model)(params, batch)
    assert np.all(np.asarray(out) == 0.0)
  target = jax.random.normal(jax.random.key(12), out.shape)
  grads = jax.jit(jax.grad(lambda p: jnp.mean((model.apply({"params": p}, *batch) - target) ** 2)))(params)
  assert np.abs(np.asarray(grads["final_layer"]["linear"]["kernel"])).max() > 0
  # Patch embedding bias starts at zero, its kernel at DiT's xavier_uniform on [P, width].
  assert np.all(np.asarray(params["x_embedder"]["bias"]) == 0)
  limit = math.sqrt(6 / (P + SMOKE["width"]))
  assert 0.9 * limit < np.abs(np.asarray(params["x_embedder"]["kernel"])).max() <= limit


def _dit_paper_param_count(depth, width, patch_dim, num_classes, learn_sigma):
  """Trainable parameters of DiT's models.py, counted by hand (its pos_embed is a frozen buffer)."""
  out_dim = 2 * patch_dim if learn_sigma else patch_dim
  block = (3 * width * width + 3 * width) + (width * width + width)  # qkv, proj
  block += (4 * width * width + 4 * width) + (4 * width * width + width)  # mlp
  block += 6 * width * width + 6 * width  # adaLN
  embed = (patch_dim * width + width) + (256 * width + width) + (width * width + width) + (num_classes + 1) * width
  final = (2 * width * width + 2 * width) + (width * out_dim + out_dim)
  return depth * block + embed + final


@pytest.mark.parametrize("variant,paper_millions", [("XL/2", 675), ("S/2", 33)])
def test_param_counts_match_dit_paper(variant, paper_millions):
  patch_dim = 2 * 2 * 4  # 32x32x4 latents, patch 2
  model = dit.build_dit(dict(variant=variant, num_classes=1000, learn_sigma=True), patch_dim=patch_dim)
  L = 16 * 16
  batch = (jnp.zeros((1, L, patch_dim)), jnp.zeros((1, L)), jnp.zeros((1, 1), jnp.int32),
           jnp.ones((1, L), jnp.int32), jnp.zeros((1, L, 3), jnp.int32))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *batch)))["params"]
  count = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))
  size = dit.VARIANTS[variant]
  assert count == _dit_paper_param_count(size["depth"], size["width"], patch_dim, 1000, True)
  assert abs(count / 1e6 - paper_millions) / paper_millions < 0.01
  if variant == "XL/2":  # DiT's printed total, which includes the 256 x 1152 frozen pos_embed
    assert count + L * size["width"] == 675_129_632


def test_variants_table_and_build_from_config():
  assert len(dit.VARIANTS) == 15
  assert dit.VARIANTS["3B/2"] == dict(depth=28, width=2304, num_heads=18, patch=2)
  assert dit.VARIANTS["XL/2"] == dict(depth=28, width=1152, num_heads=16, patch=2)
  assert dit.VARIANTS["B/8"] == dict(depth=12, width=768, num_heads=12, patch=8)
  config = _load_image_config("smoke")
  model = dit.build_dit(config.model, patch_dim=P)
  assert (model.depth, model.width, model.num_heads, model.num_classes) == (2, 32, 2, 10)
  assert model.learn_sigma and model.scan_layers and model.pos_embedding == "sincos2d"
  with pytest.raises(ValueError, match="valid: .*XL/2"):
    dit.build_dit(dict(variant="XXL/2", num_classes=10), patch_dim=P)


def test_bfloat16_compute_keeps_float32_params_and_output():
  batch = _small_batch(3)
  model = dit.DiT(**SMOKE)
  params = _randomize(_init(model, batch), jax.random.key(15))
  out32 = _apply(model)(params, batch)
  out16 = _apply(model.clone(dtype=jnp.bfloat16))(params, batch)
  assert out16.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert 0 < float(jnp.abs(out16 - out32).max()) < 0.05 * float(jnp.abs(out32).max())


def test_bad_inputs_raise_value_errors():
  batch = _small_batch()
  model = dit.DiT(**SMOKE)
  x, t, labels, seg, pos = batch
  with pytest.raises(ValueError, match="patch_dim"):
    model.init(jax.random.key(0), x[..., :5], t, labels, seg, pos)
  with pytest.raises(ValueError, match="t must be"):
    model.init(jax.random.key(0), x, t[:, :3], labels, seg, pos)
  with pytest.raises(ValueError, match="pos_embedding"):
    model.clone(pos_embedding="learned").init(jax.random.key(0), *batch)
  with pytest.raises(ValueError, match="remat"):
    model.clone(remat="some").init(jax.random.key(0), *batch)


# ---------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------


def _mesh_and_rules():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                for name, axes in _load_image_config().mesh.rules)
  return mesh, rules


@pytest.mark.parametrize("variant", ["smoke", "tiny"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_logical_names_and_valid_shardings(variant, scan_layers):
  mesh, rules = _mesh_and_rules()
  model = dit.build_dit(dict(variant=variant, num_classes=10, scan_layers=scan_layers), patch_dim=P)
  batch = _small_batch()
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *batch))["params"]
  boxed = jax.tree.leaves(abstract, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  for leaf in boxed:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= LOGICAL_NAMES, leaf.names
    assert set(leaf.names) <= {name for name, _ in rules}, f"no mesh rule for {leaf.names}"
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  sharded_dims = 0
  for leaf, sharding in zip(boxed, jax.tree.leaves(shardings)):
    shape = leaf.value.shape
    for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * len(shape)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      assert dim % math.prod(mesh.shape[a] for a in axes) == 0, (shape, sharding.spec)
      sharded_dims += bool(axes)
    assert len(sharding.shard_shape(shape)) == len(shape)
  assert sharded_dims > len(boxed)  # 'embed', 'mlp', 'heads' really split the weights
  if scan_layers:
    assert all(leaf.names[0] == "layers" for leaf in jax.tree.leaves(
        abstract["blocks"], is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned)))


@pytest.mark.xfail(strict=True, reason="XLA SPMD miscompile on a (2, 2, 2) CPU mesh (jax 0.10.2)")
def test_xla_miscompiles_a_tensor_sharded_modulation_split():
  """Why the config maps the 'modulation' axis to None.

  With the batch over ('data', 'fsdp') and an adaLN-style projection sharded
  over ('fsdp', 'tensor') and then split, XLA (GSPMD and Shardy alike) returns
  wrong rows on a (2, 2, 2) CPU mesh. Plain JAX, no Flax. When this starts to
  pass, the 'modulation' rule may shard over 'tensor' again.
  """
  from jax.sharding import NamedSharding, PartitionSpec as Ps
  rng = np.random.default_rng(0)
  x, c = (rng.normal(size=(4, 8, 32)).astype(np.float32) for _ in range(2))
  w1, w2, wm = (rng.normal(size=s).astype(np.float32) * 0.2 for s in [(32, 128), (128, 32), (32, 64)])

  def f(x, w1, w2, wm):
    shift, gate = jnp.split(c @ wm, 2, axis=-1)
    return x + gate * (((x + shift) @ w1) @ w2)

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  specs = [Ps(("data", "fsdp")), Ps("fsdp", "tensor"), Ps("tensor", "fsdp"), Ps("fsdp", "tensor")]
  with jax.set_mesh(mesh):
    out = jax.jit(f, in_shardings=tuple(NamedSharding(mesh, s) for s in specs))(x, w1, w2, wm)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(f)(x, w1, w2, wm)), atol=1e-4)


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_init_and_forward_match_single_device(mesh_shape):
  _, rules = _mesh_and_rules()
  mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  model = dit.build_dit(dict(variant="smoke", num_classes=10, pos_embedding="rope3d"), patch_dim=P)
  keys = jax.random.split(jax.random.key(13), 4)
  batch = _pack([[_example(k, 1, 2, 3, 70.0, 4)] for k in keys], 8, 1)  # B = 4 = data x fsdp
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *batch))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    variables = jax.jit(lambda: model.init(jax.random.key(0), *batch), out_shardings=shardings)()
    fresh = nn.unbox(variables)["params"]
    params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                          _randomize(fresh, jax.random.key(14)), fresh)
    out = jax.jit(lambda p: model.apply({"params": p}, *batch))(params)
  kernel = params["blocks"]["mlp"]["fc1"]["kernel"]  # [layers, embed -> fsdp, mlp -> tensor]
  assert kernel.sharding.shard_shape(kernel.shape) == (2, 32 // mesh_shape[1], 128 // mesh_shape[2])
  local = jax.tree.map(np.asarray, params)
  np.testing.assert_allclose(out, _apply(model)(local, batch), atol=1e-5)
