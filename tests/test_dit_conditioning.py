"""Conditioning per (example, clock) equals DiT's conditioning per token, and adaLN-single."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import patches
from diffusion_jax.data import packing
from diffusion_jax.models import dit

TEXT_DIM = 8
PATCH_DIM = 12


class PerTokenDiT(dit.DiT):
  """The reference: c, and every modulation, computed for each token on its own (one slot a token)."""

  def condition_slots(self, t, segment_ids, num_examples):
    rows, length = segment_ids.shape
    slot = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    return slot, t.astype(jnp.float32), jnp.maximum(segment_ids - 1, 0).astype(jnp.int32)


def _perturbed(params, scale=0.05):
  """Params moved off their (often zero) init, so every modulation and gate matters."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _rows(grids, *, length, k, lt, seed=0):
  """One or more packed rows of examples of the given (T', H', W') grids, with captions and padding."""
  rng = np.random.default_rng(seed)
  examples = [dict(patches=rng.normal(size=(int(np.prod(g)), PATCH_DIM)).astype(np.float32),
                   positions=patches.grid_positions(g), grid=np.asarray(g, np.int32), id=i, label=i % 5,
                   caption=f"example {i}", text=rng.normal(size=(2 + i % 3, TEXT_DIM)).astype(np.float32))
              for i, g in enumerate(grids)]
  rows = packing.pack_examples(examples, length, k, text_tokens_per_row=lt)
  return {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0] if key not in packing.HOST_KEYS}


def _times(batch, seed=0, cond_frames=True):
  """Per-token t: each example its own t, its first frame clean (t = 0) for videos when cond_frames."""
  rng = np.random.default_rng(seed)
  k = batch["labels"].shape[1]
  t_example = rng.uniform(1, 999, size=(batch["labels"].shape[0], k)).astype(np.float32)
  t = np.take_along_axis(t_example, np.maximum(batch["segment_ids"] - 1, 0), axis=1)
  frames = np.take_along_axis(batch["grid"][..., 0], np.maximum(batch["segment_ids"] - 1, 0), axis=1)
  cond = (batch["positions"][..., 0] == 0) & (frames > 1) & (batch["segment_ids"] > 0)
  return np.where(cond & cond_frames, 0.0, t).astype(np.float32), cond


CASES = {
    # name: (grids, length, k, text, num_classes, pooled_text)
    "images_classes": ([(1, 2, 3), (1, 3, 3), (1, 2, 2)], 32, 4, False, 5, False),
    "video_text_cond_frames": ([(3, 2, 2), (1, 3, 3), (2, 2, 3), (1, 2, 2)], 48, 4, True, 0, False),
    "video_classes_and_pooled_text": ([(2, 3, 2), (3, 2, 2), (1, 2, 3)], 40, 3, True, 5, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scan_layers", [True, False])
def test_per_example_conditioning_equals_per_token(case, scan_layers):
  grids, length, k, text, num_classes, pooled_text = CASES[case]
  batch = _rows(grids, length=length, k=k, lt=16)
  assert (batch["segment_ids"] == 0).any(), "the case must hold padding"
  t, cond = _times(batch)
  if case != "images_classes":
    assert cond.any(), "the case must hold conditioning frames"
  kwargs = dict(patch_dim=PATCH_DIM, width=32, depth=2, num_heads=2, num_classes=num_classes, learn_sigma=True,
                pos_embedding="rope3d" if text else "sincos2d", text_dim=TEXT_DIM if text else 0,
                pooled_text=pooled_text, scan_layers=scan_layers)
  model, reference = dit.DiT(**kwargs), PerTokenDiT(**kwargs)
  text_args = dict(text=batch["text"], text_segment_ids=batch["text_segment_ids"]) if text else {}
  args = (batch["patches"], t, batch["labels"], batch["segment_ids"], batch["positions"])
  params = model.init(jax.random.PRNGKey(0), *args, **text_args)["params"]
  # The same parameter tree: checkpoints of the per-token model load unchanged.
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      reference.init(jax.random.PRNGKey(0), *args, **text_args)["params"])
  params = _perturbed(params)
  out = jax.jit(lambda p: model.apply({"params": p}, *args, **text_args))(params)
  ref = jax.jit(lambda p: reference.apply({"params": p}, *args, **text_args))(params)
  real = batch["segment_ids"] > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)

  def loss(module):
    return lambda p: jnp.sum(jnp.where(real[..., None], module.apply({"params": p}, *args, **text_args), 0.0) ** 2)

  grads, ref_grads = jax.jit(jax.grad(loss(model)))(params), jax.jit(jax.grad(loss(reference)))(params)
  for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_slots", [1, 12, dit.SELECT_MAX_SLOTS + 4])  # selects, and the gather beyond
def test_to_tokens_takes_each_tokens_slot_and_sums_gradients_per_slot(num_slots):
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.normal(size=(3, num_slots, 5)), jnp.float32)
  slot = jnp.asarray(rng.integers(0, num_slots, size=(3, 40)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(3, 40, 5)), jnp.float32)
  np.testing.assert_array_equal(dit.to_tokens(values, slot), np.take_along_axis(np.asarray(values), slot[..., None], 1))
  grad = jax.jit(jax.grad(lambda v: jnp.sum(dit.to_tokens(v, slot) * weights)))(values)
  expected = np.zeros(values.shape, np.float32)
  for b in range(3):
    np.add.at(expected[b], np.asarray(slot[b]), np.asarray(weights[b]))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


def test_clocks_read_off_per_token_times():
  batch = _rows([(3, 2, 2), (1, 2, 2)], length=24, k=3, lt=8)
  t, cond = _times(batch)
  slot, t_slot = dit.conditioning_clocks(jnp.asarray(t), jnp.asarray(batch["segment_ids"]), 3)
  slot, t_slot = np.asarray(slot), np.asarray(t_slot)
  seg = batch["segment_ids"][0]
  video, image = seg == 1, seg == 2
  assert (slot[0][video & ~cond[0]] == 0).all() and (slot[0][video & cond[0]] == 3).all()
  assert (slot[0][image] == 1).all() and (slot[0][seg == 0] == 0).all()
  np.testing.assert_array_equal(t_slot[0, [0, 3]], [t[0][video].max(), 0.0])
  assert t_slot[0, 2] == 0.0 and t_slot[0, 5] == 0.0  # the third example slot is empty


def test_adaln_single_saves_parameters_and_starts_as_identity():
  batch = _rows([(2, 2, 2), (1, 3, 3)], length=24, k=2, lt=8)
  t, _ = _times(batch)
  args = (batch["patches"], t, batch["labels"], batch["segment_ids"], batch["positions"])
  text = dict(text=batch["text"], text_segment_ids=batch["text_segment_ids"])
  counts, outs = {}, {}
  for adaln in ("zero", "single"):
    model = dit.DiT(patch_dim=PATCH_DIM, width=32, depth=3, num_heads=2, num_classes=0, text_dim=TEXT_DIM,
                    learn_sigma=False, pos_embedding="rope3d", adaln=adaln)
    params = model.init(jax.random.PRNGKey(0), *args, **text)["params"]
    counts[adaln] = sum(p.size for p in jax.tree_util.tree_leaves(params))
    outs[adaln] = np.asarray(model.apply({"params": params}, *args, **text))
  width, depth = 32, 3
  # zero: 6w(w+1) per block + 2w(w+1) final; single: one 6w(w+1) + 6w per block + 2w final.
  assert counts["zero"] - counts["single"] == 6 * width * (width + 1) * (depth - 1) + 2 * width * (width + 1) - \
      6 * width * depth - 2 * width
  assert (outs["single"] == 0).all()  # the zero-initialised final linear, as adaLN-Zero


def test_pooled_caption_is_each_examples_mean_and_reaches_only_its_example():
  batch = _rows([(2, 2, 2), (1, 3, 3), (1, 2, 2)], length=32, k=3, lt=12)
  pooled = np.asarray(dit.pool_captions(jnp.asarray(batch["text"]), jnp.asarray(batch["text_segment_ids"]), 3))
  for k in range(3):
    mine = batch["text_segment_ids"][0] == k + 1
    np.testing.assert_allclose(pooled[0, k], batch["text"][0][mine].mean(axis=0), rtol=1e-6)
  t, _ = _times(batch)
  model = dit.DiT(patch_dim=PATCH_DIM, width=32, depth=2, num_heads=2, num_classes=0, text_dim=TEXT_DIM,
                  learn_sigma=False, pos_embedding="rope3d", pooled_text=True)
  args = (batch["patches"], t, batch["labels"], batch["segment_ids"], batch["positions"])
  params = _perturbed(model.init(jax.random.PRNGKey(0), *args, text=batch["text"],
                                 text_segment_ids=batch["text_segment_ids"])["params"])
  assert "pooled_text_embedder" in params
  apply = jax.jit(lambda text: model.apply({"params": params}, *args, text=text,
                                           text_segment_ids=batch["text_segment_ids"]))
  base = np.asarray(apply(batch["text"]))
  # Scaling example 1's caption tokens moves its mean (and so its c), nobody else's output.
  moved = np.asarray(apply(np.where((batch["text_segment_ids"] == 1)[..., None], 3.0 * batch["text"], batch["text"])))
  seg = batch["segment_ids"][0]
  assert np.abs(moved[0, seg == 1] - base[0, seg == 1]).max() > 1e-3
  np.testing.assert_allclose(moved[0, seg > 1], base[0, seg > 1], atol=1e-6)
