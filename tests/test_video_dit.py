"""The packed video DiT: isolation of packed examples, rectified flow, conditioning modes, the sampler API."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax import config_defaults, inference
from diffusion_jax import patches
from diffusion_jax import sample as sample_lib
from diffusion_jax.data import packing
from diffusion_jax.models import dit
from diffusion_jax.train import dit_task

TEXT_DIM = 8


def _model(**kwargs):
  defaults = dict(patch_dim=12, width=32, depth=2, num_heads=2, num_classes=0, text_dim=TEXT_DIM, learn_sigma=False,
                  pos_embedding="rope3d", qk_norm=True)
  return dit.DiT(**{**defaults, **kwargs})


def _perturbed(params, scale=0.05):
  """Params with every leaf moved off its (often zero) init, so no sublayer is the identity."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _example(rng, grid, n_text, index):
  tokens = int(np.prod(grid))
  return dict(patches=rng.normal(size=(tokens, 12)).astype(np.float32), positions=patches.grid_positions(grid),
              grid=np.asarray(grid, np.int32), id=index, label=0, caption=f"example {index}",
              text=rng.normal(size=(n_text, TEXT_DIM)).astype(np.float32))


def _row(examples, length=40, k=4, lt=16):
  rows = packing.pack_examples(examples, length, k, text_tokens_per_row=lt)
  assert len(rows) == 1
  return {key: np.asarray(v)[None] for key, v in rows[0].items() if key not in packing.HOST_KEYS}


def test_a_packed_row_gives_each_example_what_it_gets_alone():
  rng = np.random.default_rng(0)
  model = _model()
  examples = [_example(rng, (2, 2, 3), 3, 0), _example(rng, (1, 3, 3), 5, 1), _example(rng, (3, 2, 2), 2, 2)]
  row = _row(examples)
  # Each example its own t (the model's contract), the first clip's first frame clean context at t = 0.
  t = rng.uniform(0, 1000, size=row["labels"].shape).astype(np.float32)
  t = np.take_along_axis(t, np.maximum(row["segment_ids"] - 1, 0), axis=1)
  t = np.where((row["segment_ids"] == 1) & (row["positions"][..., 0] == 0), 0.0, t).astype(np.float32)

  def apply(params, batch, t):
    return model.apply(params, batch["patches"], t, batch["labels"], batch["segment_ids"], batch["positions"],
                       text=batch["text"], text_segment_ids=batch["text_segment_ids"])

  params = _perturbed(model.init(jax.random.PRNGKey(0), row["patches"], t, row["labels"], row["segment_ids"],
                                 row["positions"], text=row["text"], text_segment_ids=row["text_segment_ids"]))
  packed = np.asarray(apply(params, row, t))
  for k in range(3):
    mask = row["segment_ids"][0] == k + 1
    ex = examples[row["example_ids"][0, k]]
    alone = _row([ex], length=int(mask.sum()), k=1, lt=ex["text"].shape[0])
    out = np.asarray(apply(params, alone, t[:, mask]))
    np.testing.assert_allclose(packed[0, mask], out[0], atol=2e-5, rtol=1e-5)
  # The caption matters, and only to its own example.
  changed = dict(row, text=np.where((row["text_segment_ids"] == 1)[..., None], 0.0, row["text"]))
  moved = np.asarray(apply(params, changed, t))
  assert np.abs(moved[0, row["segment_ids"][0] == 1] - packed[0, row["segment_ids"][0] == 1]).max() > 1e-4
  np.testing.assert_allclose(moved[0, row["segment_ids"][0] > 1], packed[0, row["segment_ids"][0] > 1], atol=1e-6)


def _config(**diffusion):
  return config_defaults.recipe(
      "dit", data=dict(patch=(1, 2, 2), channels=3, tokens_per_row=40, examples_per_row=4, text_tokens_per_row=16),
      model=dict(variant="smoke", num_classes=0, text_dim=TEXT_DIM, learn_sigma=False),
      diffusion=dict(kind="flow", shift_base_tokens=16, logit_mean=0.0, logit_std=1.0, cond={}, **diffusion))


def test_frame_cond_mask_modes():
  rng = np.random.default_rng(1)
  row = _row([_example(rng, (4, 2, 2), 1, 0), _example(rng, (1, 3, 3), 1, 1)], length=40)
  video = row["segment_ids"] == 1
  frame = row["positions"][..., 0]
  for mode, expected in [("i2v", frame == 0), ("interpolate", (frame == 0) | (frame == 3)),
                         ("extend", None), ("random", None)]:
    cond = np.asarray(dit_task.frame_cond_mask(jax.random.PRNGKey(0), row, {mode: 1.0}))
    assert not cond[~video].any(), f"{mode}: an image (or padding) got context"
    if expected is not None:
      np.testing.assert_array_equal(cond[video], expected[video])
    else:
      assert cond[video].any() and not cond[video & (frame == 3)].any(), mode  # the last frame is predicted
    # Context is whole frames: every token of a frame agrees.
    for f in range(4):
      assert len(set(cond[video & (frame == f)].tolist())) == 1, (mode, f)
  none = np.asarray(dit_task.frame_cond_mask(jax.random.PRNGKey(0), row, {"i2v": 0.0}))
  assert not none.any()


def test_flow_loss_masks_conditioning_tokens_and_learns():
  rng = np.random.default_rng(2)
  config = _config()
  model = _model()
  row = _row([_example(rng, (3, 2, 2), 2, 0), _example(rng, (2, 2, 2), 2, 1)])
  row["patches"] = np.clip(row["patches"], -1, 1)
  batch = {k: jnp.asarray(np.repeat(v, 2, axis=0)) for k, v in row.items()}
  params = dit_task.init_params(model, ml_collections.ConfigDict(
      dict(data=config.data, model=config.model)), jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda p: getattr(p, "value", p), params,
                                  is_leaf=lambda p: hasattr(p, "value"))
  objective = dit_task.make_objective(config)
  loss_fn = jax.jit(lambda p, r: dit_task.loss_fn(p, model, objective, batch, r, config)[0])
  # All tokens as context: nothing left to predict, loss 0 (not NaN).
  all_cond = dict(batch, cond_mask=batch["segment_ids"] > 0)
  zero, _ = dit_task.loss_fn(params, model, objective, all_cond, jax.random.PRNGKey(0), config)
  assert float(zero) == 0.0
  import optax
  opt = optax.adam(3e-3)
  state = opt.init(params)
  grad = jax.jit(jax.grad(lambda p, r: dit_task.loss_fn(p, model, objective, batch, r, config)[0]))
  first = np.mean([float(loss_fn(params, jax.random.PRNGKey(i))) for i in range(8)])
  for i in range(50):
    updates, state = opt.update(grad(params, jax.random.PRNGKey(100 + i)), state)
    params = optax.apply_updates(params, updates)
  last = np.mean([float(loss_fn(params, jax.random.PRNGKey(i))) for i in range(8)])
  assert last < 0.85 * first, (first, last)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_generate_keeps_given_tokens_and_edits(sampler):
  rng = np.random.default_rng(3)
  config = _config()
  model = _model()
  row = _row([_example(rng, (3, 2, 2), 2, 0), _example(rng, (2, 3, 2), 3, 1)])
  params = _perturbed(model.init(jax.random.PRNGKey(0), row["patches"], row["segment_ids"].astype(np.float32),
                                 row["labels"], row["segment_ids"], row["positions"], text=row["text"],
                                 text_segment_ids=row["text_segment_ids"]))["params"]
  rows = dict(row, cond_mask=(row["segment_ids"] == 1) & (row["positions"][..., 0] == 0),
              strength=np.array([[1.0, 0.3, 1.0, 1.0]], np.float32))
  run = jax.jit(lambda r, key: dit_task.generate(model, params, config, r, key, sampler=sampler, steps=6,
                                                 cfg_scale=3.0))
  out = np.asarray(run(rows, jax.random.PRNGKey(0)))
  assert out.shape == row["patches"].shape and np.isfinite(out).all()
  kept = rows["cond_mask"][0]
  np.testing.assert_array_equal(out[0, kept], row["patches"][0, kept])  # i2v: the given frame, exactly
  assert np.abs(out[0, (row["segment_ids"][0] == 1) & ~kept] - row["patches"][0, (row["segment_ids"][0] == 1) & ~kept]).max() > 1e-3
  # SDEdit at strength 0.3 stays nearer its source than a sample from pure noise does.
  edit = row["segment_ids"][0] == 2
  rows_full = dict(rows, strength=np.ones_like(rows["strength"]))
  out_full = np.asarray(run(rows_full, jax.random.PRNGKey(0)))
  near = np.abs(out[0, edit] - row["patches"][0, edit]).mean()
  far = np.abs(out_full[0, edit] - row["patches"][0, edit]).mean()
  assert near < 0.6 * far, (near, far)


class _FakeEncoder:
  """Text encoder stand-in: a caption's tokens are its characters' codes spread over TEXT_DIM."""

  def encode(self, texts, max_length=32):
    tokens = np.zeros((len(texts), max_length, TEXT_DIM), np.float32)
    mask = np.zeros((len(texts), max_length), bool)
    for i, text in enumerate(texts):
      codes = [ord(ch) / 128.0 for ch in text[:max_length]]
      tokens[i, :len(codes)] = np.asarray(codes)[:, None] * np.linspace(-1, 1, TEXT_DIM)
      mask[i, :len(codes)] = True
    return tokens, mask


def test_sample_requests_packs_sizes_modes_and_splits_calls(tmp_path):
  import imageio.v3 as iio

  config = _config()
  config.data.update(tokens_per_row=64, examples_per_row=2, text_tokens_per_row=64)
  config.sample = dict(sampler="euler", steps=3, cfg_scale=2.0, rows_per_call=1)
  model = _model()
  dummy = dit_task.dummy_batch(config, 1)
  params = _perturbed(model.init(jax.random.PRNGKey(0), dummy["patches"], dummy["segment_ids"].astype(np.float32),
                                 dummy["labels"], dummy["segment_ids"], dummy["positions"], text=dummy["text"],
                                 text_segment_ids=dummy["text_segment_ids"]))["params"]
  gen = inference.Generator(config, model, params, vae=None, text_encoder=_FakeEncoder())
  clip = (np.random.default_rng(0).uniform(0, 255, (5, 8, 10, 3))).astype(np.uint8)
  iio.imwrite(tmp_path / "clip.gif", clip, duration=100, loop=0)
  given = iio.imread(tmp_path / "clip.gif", index=None)
  requests = sample_lib.parse_requests(
      ["a 3 moving left"], "", dict(size=(9, 11), frames=3))  # rounds to 8 x 10, 3 frames
  requests += [sample_lib.Request("a 7", (8, 10), 3, mode="i2v", input=str(tmp_path / "clip.gif")),
               sample_lib.Request("a 1", (6, 6), 2, mode="extend", input=str(tmp_path / "clip.gif")),
               sample_lib.Request("a 2", (8, 10), 3, mode="interpolate", input=str(tmp_path / "clip.gif"))]
  videos, notes = sample_lib.sample_requests(gen, requests, sampler="euler", steps=3, cfg_scale=2.0, rows_per_call=1)
  assert [v.shape for v in videos] == [(3, 8, 10, 3), (3, 8, 10, 3), (2, 6, 6, 3), (3, 8, 10, 3)]
  assert notes[0]["size_made"] == [8, 10]
  resized = lambda frames, h, w: sample_lib._fit_input(frames, (len(frames), h, w))
  np.testing.assert_allclose(videos[1][0], resized(given, 8, 10)[0], atol=1)  # i2v keeps frame 0 (uint8 rounding)
  np.testing.assert_allclose(videos[2][0], resized(given, 6, 6)[0], atol=1)  # extension keeps the given frame
  np.testing.assert_allclose(videos[3][[0, -1]], resized(given, 8, 10)[[0, -1]], atol=1)  # interpolation: both ends
  manifest = sample_lib.write_outputs(videos, requests, notes, str(tmp_path / "out"), gen=gen, sampler="euler",
                                      steps=3, cfg_scale=2.0, seed=0)
  lines = open(manifest).read().splitlines()
  assert len(lines) == 4 and (tmp_path / "out" / "sample_0.gif").exists()
  with pytest.raises(ValueError, match="more than one row holds"):
    sample_lib.pack_requests(gen, [sample_lib.Request("big", (64, 64), 3)])
  with pytest.raises(ValueError, match="cannot read input"):
    (tmp_path / "bad.gif").write_bytes(b"not a gif")
    sample_lib.pack_requests(gen, [sample_lib.Request("x", (8, 8), 3, mode="i2v", input=str(tmp_path / "bad.gif"))])
