"""The DDPM/LDM U-Net behind the packed-batch interface: layout, conditioning, size, training, sharding."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import patches
from diffusion_jax import sharding
from diffusion_jax.config import ConfigError
from diffusion_jax.models import unet
from diffusion_jax.train import dit_task

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "ddpm_digits.py")
SMOKE = dict(variant="smoke", num_classes=10)


def _model(patch=(1, 2, 2), frames=1, size=16, channels=3, **overrides):
  grid = (frames // patch[0], size // patch[1], size // patch[2])
  return unet.build_unet({**SMOKE, **overrides}, patch_dim=math.prod(patch) * channels, grid=grid, patch=patch,
                         channels=channels)


def _images(rows, frames=1, size=16, channels=3, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (rows, frames, size, size, channels)).astype(np.float32)


def _batch(videos, patch=(1, 2, 2), t=10.0, label=3):
  """Packed rows of one video each: (x, t, labels, segment_ids, positions)."""
  tokens, positions = [], None
  for video in videos:
    tok, positions, _ = patches.patchify(video, patch)
    tokens.append(tok)
  x = jnp.asarray(np.stack(tokens))
  rows, length = x.shape[:2]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1, 1), (rows, length))
  labels = jnp.broadcast_to(jnp.asarray(label, jnp.int32).reshape(-1, 1), (rows, 1))
  return (x, t, labels, jnp.ones((rows, length), jnp.int32),
          jnp.broadcast_to(jnp.asarray(positions), (rows, length, 3)))


def _random_params(model, batch, seed, **kwargs):
  """Params of the right shapes drawn at random (GroupNorm scales near 1) with NumPy, so no
  init or random kernel compiles: DDPM's zero-initialised output layers would hide every dependence."""
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *batch, **kwargs))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray((1.0 if path[-1].key == "scale" else 0.0)
                                     + 0.1 * rng.normal(size=leaf.shape).astype(np.float32)), abstract)


def _apply(model, **static):
  """Jitted apply; `static` (e.g. train=True) is fixed at trace time, other keywords are traced."""
  return jax.jit(lambda params, *batch, **kwargs: model.apply({"params": params}, *batch, **static, **kwargs))


# ---------------------------------------------------------------------------
# Layout and shapes
# ---------------------------------------------------------------------------


def test_output_shape_and_layout_do_not_depend_on_the_patch():
  """The U-Net runs on pixels, so (1, 2, 2) and (1, 1, 1) rows of the same
  image give the same image back after unpatchify, for the prediction and the
  learned-variance halves alike (each in (pt, ph, pw, C) order)."""
  images = _images(2)
  outputs = {}
  params = None
  for patch in [(1, 2, 2), (1, 1, 1)]:
    model = _model(patch, learn_sigma=True)
    batch = _batch(images, patch, t=jnp.array([5.0, 70.0]))
    params = params or _random_params(model, batch, 1)  # the patch changes no parameter
    out = _apply(model)(params, *batch)
    p = math.prod(patch) * 3
    assert out.shape == (2, 256 // math.prod(patch), 2 * p) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    outputs[patch] = [jax.vmap(lambda tok: patches.unpatchify(tok, model.grid, patch, 3))(h)
                      for h in (out[..., :p], out[..., p:])]
  for a, b in zip(outputs[(1, 2, 2)], outputs[(1, 1, 1)]):
    assert a.shape == (2, 1, 16, 16, 3)
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert np.max(np.abs(outputs[(1, 1, 1)][0] - outputs[(1, 1, 1)][1])) > 1e-3  # two distinct halves


def test_video_frames_run_as_independent_images():
  model = _model(patch=(2, 2, 2), frames=2)
  videos = _images(1, frames=2)
  batch = _batch(videos, (2, 2, 2))
  params = _random_params(model, batch, 2)
  out = _apply(model)(params, *batch)
  assert out.shape == (1, 64, 24)
  changed = videos.copy()
  changed[:, 1] = -changed[:, 1]
  out2 = _apply(model)(params, *_batch(changed, (2, 2, 2)))
  frames = lambda o: patches.unpatchify(o[0, :, :24], model.grid, (2, 2, 2), 3)  # the prediction half
  np.testing.assert_allclose(frames(out)[0], frames(out2)[0], atol=1e-6)  # frame 0 untouched
  assert np.max(np.abs(frames(out)[1] - frames(out2)[1])) > 1e-3


def test_param_count_of_ddpm_cifar10_is_the_papers_35_7m():
  """Ho et al. 2020 (Appendix B): 35.7M parameters for the unconditional CIFAR-10 model."""
  model = unet.build_unet(dict(variant="ddpm_cifar", num_classes=0), patch_dim=3, grid=(1, 32, 32),
                          patch=(1, 1, 1), channels=3)
  batch = _batch(np.zeros((1, 1, 32, 32, 3), np.float32), (1, 1, 1))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *batch))["params"]
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))
  assert count == 35_746_307  # the count of DDPM's released CIFAR-10 checkpoint
  assert round(count / 1e6, 1) == 35.7


# ---------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------


def test_timestep_and_class_label_change_the_output_and_label_dropout_uses_the_null_class():
  model = _model(class_dropout_prob=1.0)  # the probability only matters with train=True
  images = _images(1)
  base = _batch(images, t=10.0, label=3)
  params = _random_params(model, base, 3)
  apply = _apply(model)
  out = apply(params, *base)
  assert out.shape == (1, 64, 12)
  null = apply(params, *_batch(images, t=10.0, label=10))  # 10 = the null class
  for other in [apply(params, *_batch(images, t=500.0, label=3)), apply(params, *_batch(images, t=10.0, label=7)),
                null]:
    assert np.max(np.abs(other - out)) > 1e-3
  np.testing.assert_allclose(apply(params, *_batch(images, t=10.0, label=3)), out, atol=1e-6)
  dropped = _apply(model, train=True)(params, *base, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(dropped, null, atol=1e-6)


def test_cross_attention_sees_only_its_own_examples_text():
  model = _model(text_dim=8)
  images = _images(2)
  batch = _batch(images)
  rng = np.random.default_rng(5)
  text = rng.normal(size=(2, 5, 8)).astype(np.float32)
  text_ids = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int32)
  params = _random_params(model, batch, 6, text=text, text_segment_ids=text_ids)
  apply = _apply(model)
  out = apply(params, *batch, text=text, text_segment_ids=text_ids)

  other_row = text.copy()
  other_row[1] = rng.normal(size=(5, 8))  # row 1's caption changes
  out2 = apply(params, *batch, text=other_row, text_segment_ids=text_ids)
  np.testing.assert_allclose(out2[0], out[0], atol=1e-6)
  assert np.max(np.abs(out2[1] - out[1])) > 1e-3

  padding = text.copy()
  padding[0, 3:] = 100.0  # row 0's padding tokens
  np.testing.assert_allclose(apply(params, *batch, text=padding, text_segment_ids=text_ids), out, atol=1e-6)

  own = text.copy()
  own[0, :3] = rng.normal(size=(3, 8))  # row 0's real caption changes
  assert np.max(np.abs(apply(params, *batch, text=own, text_segment_ids=text_ids)[0] - out[0])) > 1e-3

  # A dropped caption (CFG) is the learned null caption: row 0's own text no longer matters,
  # row 1 keeps its caption; caption dropout 1.0 in training drops every row's.
  null_row0 = np.array([[True], [False]])
  dropped = apply(params, *batch, text=text, text_segment_ids=text_ids, text_null=null_row0)
  np.testing.assert_allclose(apply(params, *batch, text=own, text_segment_ids=text_ids, text_null=null_row0),
                             dropped, atol=1e-6)
  np.testing.assert_allclose(dropped[1], out[1], atol=1e-6)
  assert np.max(np.abs(dropped[0] - out[0])) > 1e-3
  always_drop = _model(text_dim=8, caption_dropout_prob=1.0, class_dropout_prob=0.0)
  trained = _apply(always_drop, train=True)(params, *batch, text=text, text_segment_ids=text_ids,
                                            rngs={"dropout": jax.random.key(1)})
  all_null = apply(params, *batch, text=text, text_segment_ids=text_ids, text_null=np.ones((2, 1), bool))
  np.testing.assert_allclose(trained, all_null, atol=1e-6)


def test_bad_inputs_are_clear_errors():
  model = _model()
  x, t, labels, seg, pos = _batch(_images(1))
  with pytest.raises(ValueError, match="one example of grid"):
    model.init(jax.random.key(0), x[:, :32], t[:, :32], labels, seg[:, :32], pos[:, :32])
  with pytest.raises(ValueError, match="text_dim=0"):
    model.init(jax.random.key(0), x, t, labels, seg, pos, text=jnp.zeros((1, 2, 4)),
               text_segment_ids=jnp.ones((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="pass text"):
    _model(text_dim=4).init(jax.random.key(0), x, t, labels, seg, pos)
  with pytest.raises(ValueError, match="halved"):
    _model(size=18, variant="small").init(jax.random.key(0), *_batch(_images(1, size=18)))
  with pytest.raises(ValueError, match="Unknown U-Net variant"):
    _model(variant="huge")


def _smoke_config(*overrides):
  config = config_lib.load_config(CONFIG + ":smoke")
  config_lib.apply_overrides(config, list(overrides))
  return config


@pytest.mark.parametrize("overrides, message", [
    (["data.examples_per_row=2"], "one example filling each row"),
    (["data.tokens_per_row=128"], "one example filling each row"),
    (["data.image_size=18", "data.tokens_per_row=81", "model.variant=small"], "halved"),
    (["model.variant=S/2"], "unknown model.variant"),
    (["model.family=vit"], "unknown model.family"),
])
def test_config_validation_enforces_one_example_per_row(overrides, message):
  dit_task.validate(_smoke_config())
  with pytest.raises(ConfigError, match=message):
    dit_task.validate(_smoke_config(*overrides))


# ---------------------------------------------------------------------------
# Training through the task's loss, and sharding
# ---------------------------------------------------------------------------


def test_smoke_train_steps_through_the_task_loss_lower_it_on_a_fixed_batch():
  config = _smoke_config()
  model = dit_task.build_model(config)
  assert isinstance(model, unet.UNet)
  objective = dit_task.make_objective(config)
  # A fixed batch of 8 structured images (bars at different places), one per row.
  size = config.data.image_size
  images = np.full((8, 1, size, size, 3), -1.0, np.float32)
  for i in range(8):
    images[i, :, 2 * i:2 * i + 4, :, i % 3] = 1.0
  x, _, _, seg, pos = _batch(images, tuple(config.data.patch))
  batch = dict(patches=x, segment_ids=seg, positions=pos, cond_mask=jnp.zeros(seg.shape, bool),
               labels=jnp.arange(8, dtype=jnp.int32)[:, None] % 10)
  # The model's own initialisers; an 'rbg' key compiles the ~50 random draws of
  # the unrolled U-Net's init about 3x faster on CPU than threefry.
  params = nn.unbox(jax.jit(lambda: dit_task.init_params(model, config, jax.random.key(0, impl="rbg")))())
  optimizer = optax.adam(2e-3)
  # One compiled function serves training (fresh keys) and measuring (8 fixed
  # keys: fixed noise, timesteps and label dropout), so the test compiles once.
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, key: dit_task.loss_fn(p, model, objective, batch, key, config)[0]))
  update = jax.jit(lambda grads, opt_state, params: optimizer.update(grads, opt_state, params))

  def mean_loss(params):
    return np.mean([float(loss_and_grad(params, jax.random.key(1000 + i))[0]) for i in range(8)])

  before = mean_loss(params)
  # DDPM's zero-initialised conv_out predicts eps = 0: the loss is E[eps^2] = 1.
  assert abs(before - 1.0) < 0.1, before
  opt_state = optimizer.init(params)
  for i in range(30):
    _, grads = loss_and_grad(params, jax.random.key(i))
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  after = mean_loss(params)
  assert np.isfinite(after) and after < 0.7 * before, (before, after)


def test_params_get_valid_shardings_on_a_2x2x2_mesh():
  config = _smoke_config()
  config.mesh.shape = (2, 2, 2)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  model = _model(text_dim=8)
  batch = _batch(_images(4), t=jnp.array([1.0, 20.0, 50.0, 90.0]))
  text = dict(text=np.random.default_rng(7).normal(size=(4, 3, 8)).astype(np.float32),
              text_segment_ids=np.ones((4, 3), np.int32))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *batch, **text))["params"]
  boxed = jax.tree.leaves(abstract, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  ruled = {name for name, _ in rules}
  for leaf in boxed:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim
    named = {n for n in leaf.names if n is not None}
    assert named <= unet.LOGICAL_NAMES and named <= ruled, leaf.names
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  sharded_dims = 0
  for leaf, spec in zip(boxed, jax.tree.leaves(shardings)):
    shape = leaf.value.shape
    for dim, axes in zip(shape, tuple(spec.spec) + (None,) * len(shape)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      assert dim % math.prod(mesh.shape[a] for a in axes) == 0, (shape, spec.spec)
      sharded_dims += bool(axes)
  assert sharded_dims >= len(boxed) // 2  # conv kernels, norms, biases really split

  # Placing real arrays with these shardings is what the loop does; jax refuses any invalid one.
  params = [jax.device_put(np.zeros(leaf.value.shape, leaf.value.dtype), spec)
            for leaf, spec in zip(boxed, jax.tree.leaves(shardings))]
  by_name = dict(zip([jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      nn.unbox(abstract))[0]], params))
  kernel = by_name["['down_1_block_0']['conv1']['kernel']"]  # [3, 3, channels_in, channels -> fsdp]
  assert kernel.sharding.shard_shape(kernel.shape) == (3, 3, 16, 16)
  text_kernel = by_name["['mid_cross']['k']['kernel']"]  # [context, channels -> fsdp]
  assert text_kernel.sharding.shard_shape(text_kernel.shape) == (8, 16)
