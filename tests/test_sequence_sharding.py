"""Sequence sharding: the 'length' logical axis split over a mesh axis gives the unsharded result.

The rule ('length', 'tensor') splits every [B, L, ...] activation along L over
the mesh's 'tensor' axis (no new mesh axis); inside attention K and V are
gathered whole along L (layers.SelfAttention), so attention stays exact.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import sharding
from diffusion_jax.data import pipeline
from diffusion_jax.models import layers
from diffusion_jax.train import dit_task, loop
from test_train import first_batch, smoke_config  # the mesh-equivalence tests' helpers

L = 64  # the smoke config's tokens_per_row


def kv_gathers(hlo_text):
  """All-gathers in a compiled program that make a whole-length [B, L, heads, head_dim]
  array from pieces split along L (dimension 1): K and V in attention."""
  pattern = rf"= f32\[\d+,{L},\d+,\d+\]\S* all-gather(?:-start)?\(.*dimensions=\{{1\}}"
  return [line for line in hlo_text.splitlines() if re.search(pattern, line)]


def sequence_sharded(config, shape):
  """A copy of `config` on mesh `shape` with 'length' mapped to the 'tensor' axis.

  'heads' is left whole (the smoke model's 2 heads do not split 4 or 8 ways):
  the 'tensor' axis then carries the sequence instead of the heads; 'mlp' stays
  on it too (where a [B, L, mlp] activation has both, L takes the axis).
  """
  config = config_lib.from_json(config_lib.to_json(config))
  config.mesh.shape = shape
  replace = {"length": "tensor", "heads": None}
  config.mesh.rules = tuple((name, replace.get(name, axes)) for name, axes in config.mesh.rules)
  return config


def one_device(config):
  config = config_lib.from_json(config_lib.to_json(config))
  config.mesh.shape = (1, 1, 1)
  return config


def _perturbed_params(config):
  """Initial params with the zero-initialised layers made non-zero, so outputs depend on every layer."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  _, _, init_fn, _, _ = loop.build_state(config, mesh, sharding.logical_rules(config.mesh))
  state = jax.device_get(init_fn(jax.random.PRNGKey(0)))
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * np.sin(np.arange(p.size).reshape(p.shape)), state.params)
  return state.replace(params=params)


def _packed_inputs(config):
  """Two rows of three examples of different lengths, with padding, and their (t, h, w) positions."""
  rng = np.random.default_rng(0)
  segments = np.array([[1] * 20 + [2] * 24 + [3] * 12 + [0] * 8,
                       [1] * 36 + [2] * 16 + [3] * 9 + [0] * 3], np.int32)
  positions = np.zeros((2, L, 3), np.int32)
  for b in range(2):
    for k in (1, 2, 3):
      n = int(np.sum(segments[b] == k))
      positions[b, segments[b] == k, 1:] = np.stack([np.arange(n) // 4, np.arange(n) % 4], -1)
  return dict(x=rng.normal(size=(2, L, dit_task.patch_dim(config))).astype(np.float32),
              t=rng.integers(0, 100, (2, L)).astype(np.float32),
              labels=np.array([[1, 5, 9], [0, 2, 10]], np.int32),
              segment_ids=segments, positions=positions)


def _forward(config, params, inputs, devices):
  """jit(DiT forward) on a mesh over `devices`; returns (output, captured intermediates, compiled)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  model, _, _, _, state_shardings = loop.build_state(config, mesh, rules)
  params = jax.device_put(params, state_shardings.params)
  rows = sharding.batch_sharding(mesh)
  inputs = {k: jax.device_put(v, rows) for k, v in inputs.items()}

  def forward(params, inputs):
    return model.apply({"params": params}, inputs["x"], inputs["t"], inputs["labels"], inputs["segment_ids"],
                       inputs["positions"], train=False, capture_intermediates=True, mutable=["intermediates"])

  with sharding.activate(mesh, rules):
    compiled = jax.jit(forward).lower(params, inputs).compile()
    out, captured = compiled(params, inputs)
  return out, captured["intermediates"], compiled


@pytest.mark.parametrize("shape", [(2, 1, 4), (1, 1, 8)])
def test_dit_forward_with_the_sequence_split_equals_one_device(data_dir, shape):
  base = smoke_config(data_dir, "model.pos_embedding=rope3d")
  params = _perturbed_params(one_device(base)).params
  inputs = _packed_inputs(base)
  reference, _, _ = _forward(one_device(base), params, inputs, jax.devices()[:1])
  config = sequence_sharded(base, shape)
  out, intermediates, compiled = _forward(config, params, inputs, jax.devices())
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-5)

  # The activations really are split along the sequence: the patch embedding's
  # output [B, L, width] and the final layer's [B, L, P_out] each hold L / tensor
  # tokens a device, and the compiled program gathers K/V along L.
  tensor = shape[2]
  for name in ("x_embedder", "final_layer"):
    act = intermediates[name]["__call__"][0]
    assert act.sharding.spec[1] == "tensor", (name, act.sharding)
    assert act.sharding.shard_shape(act.shape)[1] == L // tensor
  assert compiled.output_shardings[0].spec[1] == "tensor"
  assert len(kv_gathers(compiled.as_text())) >= 2  # K and V of the scanned block


def test_train_step_with_the_sequence_split_equals_one_device(data_dir):
  # 4x4 patches: 16 tokens an image, 3 images and 16 padding tokens a row.
  base = smoke_config(data_dir, "data.patch=(1,4,4)", "data.examples_per_row=3")
  batch = first_batch(base)
  assert set(np.unique(batch["segment_ids"])) == {0, 1, 2, 3}
  state = _perturbed_params(one_device(base))

  def step(config, devices):
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.mesh)
    model, optimizer, _, _, state_shardings = loop.build_state(config, mesh, rules)
    step_fn = loop.jit_train_step(config, model, optimizer, mesh, state_shardings)
    global_batch = pipeline.make_global_batch(batch, sharding.batch_sharding(mesh))
    sharded_state = jax.device_put(state, state_shardings)
    with sharding.activate(mesh, rules):
      compiled = step_fn.lower(sharded_state, global_batch).compile()
    new_state, metrics = compiled(sharded_state, global_batch)
    return jax.device_get(new_state), jax.device_get(metrics), compiled.as_text()

  ref_state, ref_metrics, _ = step(one_device(base), jax.devices()[:1])
  new_state, metrics, text = step(sequence_sharded(base, (1, 1, 8)), jax.devices())
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert len(kv_gathers(text)) >= 2  # K and V gathered along the split sequence


def test_splash_attention_under_a_sequence_split_mesh():
  """The Pallas kernel runs per shard (shard_map): queries split along L, K/V whole."""
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("length", "tensor"), ("heads", None))
  q, k, v = (jax.random.normal(key, (2, L, 2, 8)) for key in jax.random.split(jax.random.key(0), 3))
  seg = jnp.array([[1] * 20 + [2] * 40 + [0] * 4, [1] * L], jnp.int32)
  reference = layers.dot_product_attention(q, k, v, seg, seg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(lambda q, k, v, s: layers.dot_product_attention(q, k, v, s, s, backend="splash_interpret"))(
        q, k, v, seg)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
  assert out.sharding.spec[:2] == ("data", "tensor")
