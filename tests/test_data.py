"""Built-in tfds dataset, opening sources, and the Grain pipeline to global batches."""
import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn.datasets import load_digits

from diffusion_jax import config as config_lib
from diffusion_jax import patches
from diffusion_jax.data import digits_canvas, imaging, packing, pipeline, sources

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "dit_image.py")


def _config(data_dir, **data):
  config = config_lib.load_config(CONFIG + ":smoke")  # 16 px, patch (1, 2, 2), L=64, K=1, batch 8
  config.data.data_dir = data_dir
  config.data.update(data)
  return config


def _ink_signature(ink):
  """An 8x8 digit or canvas -> its ink cropped to a centred square, resized to 8x8, max 1."""
  ys, xs = np.nonzero(ink > 0.15 * ink.max())
  crop = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  h, w = crop.shape
  side = max(h, w)
  square = np.zeros((side, side))
  square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
  out = imaging.bilinear_resize(square, 8, 8)
  return (out / out.max()).ravel()


def test_dataset_splits_features_and_real_digits(data_dir):
  train = sources.open_source("digits_canvas", "train", data_dir, image_size=16)
  val = sources.open_source("digits_canvas", "validation", data_dir, image_size=16)
  assert (len(train), len(val)) == (1597 * 6, 200 * 5)
  example = val[0]
  assert set(example) == {"video", "label", "caption", "id"}
  assert example["video"].shape == (1, 16, 16, 3) and example["video"].dtype == np.uint8
  assert sorted(int(val[i]["id"]) for i in range(len(val))) == list(range(1000))

  # Each split draws from its own digits: train / 6 + validation / 5 = sklearn's label counts.
  digits = load_digits()
  train_counts = np.bincount([ex["label"] for ex in train.__getitems__(range(len(train)))], minlength=10)
  val_labels = np.array([ex["label"] for ex in val.__getitems__(range(len(val)))])
  np.testing.assert_array_equal(train_counts // 6 + np.bincount(val_labels, minlength=10) // 5,
                                np.bincount(digits.target))

  # The pictures are the digits their labels and captions name: the nearest
  # sklearn digit (compared by ink shape) has the same label.
  reference = np.stack([_ink_signature(image) for image in digits.images])
  correct = 0
  for i in range(60):
    ex = val[i]
    video = ex["video"][0].astype(np.float64)
    assert video.std() > 10  # a digit, not a flat canvas
    colours, counts = np.unique(video.reshape(-1, 3), axis=0, return_counts=True)
    ink = np.linalg.norm(video - colours[counts.argmax()], axis=-1)
    nearest = np.argmin(((reference - _ink_signature(ink)) ** 2).sum(1))
    correct += digits.target[nearest] == ex["label"]
    caption = ex["caption"].decode()
    assert caption.startswith("a ") and f" {ex['label']} on a " in caption
    assert caption.split(" on a ")[1].removesuffix(" background") in digits_canvas.BACKGROUND_COLOURS
  assert correct >= 55


def test_generation_is_deterministic_for_a_seed(data_dir, tmp_path):
  stored = sources.open_source("digits_canvas", "validation", data_dir, image_size=16)
  by_id = {int(stored[i]["id"]): stored[i] for i in range(50)}

  def first_examples(seed, n=200):
    builder = digits_canvas.DigitsCanvas(data_dir=str(tmp_path), image_size=16, seed=seed)
    generator = builder._split_generators(None)["validation"]
    return [ex for _, ex in zip(range(n), generator)]

  regenerated = first_examples(0)
  matched = 0
  for key, ex in regenerated:
    if key in by_id:
      matched += 1
      np.testing.assert_array_equal(ex["video"], by_id[key]["video"])
      assert ex["caption"] == by_id[key]["caption"].decode() and ex["label"] == by_id[key]["label"]
  assert matched >= 5
  other = first_examples(1, n=20)
  assert any(not np.array_equal(a[1]["video"], b[1]["video"]) for a, b in zip(regenerated, other))


def test_open_source_errors_name_what_was_looked_for(data_dir, tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}.*is not a prepared tfds dataset directory"):
    sources.open_source(str(tmp_path), "train")
  with pytest.raises(ValueError, match=r"digits_canvas/64px/1\.0\.0 is not a prepared tfds.*ensure_dataset"):
    sources.open_source("digits_canvas", "train", data_dir, image_size=64)
  with pytest.raises(ValueError, match=r"split 'test' not found in .*available splits: \['train', 'validation'\]"):
    sources.open_source("digits_canvas", "test", data_dir, image_size=16)
  with pytest.raises(ValueError, match="neither a built-in dataset"):
    sources.open_source("no_such_dataset", "train", data_dir)
  builder_dir = os.path.join(data_dir, "digits_canvas", "16px", "1.0.0")
  assert len(sources.open_source(builder_dir, "validation")) == 1000  # a directory works too
  sources.ensure_dataset(builder_dir, image_size=16)  # already prepared: nothing to do
  with pytest.raises(ValueError, match="unknown built-in dataset 'no_such_dataset'"):
    sources.ensure_dataset("no_such_dataset", data_dir)


@pytest.mark.parametrize("tokens_per_row,examples_per_row", [(64, 1), (160, 3)])
def test_pipeline_batches_meet_the_contract(data_dir, tokens_per_row, examples_per_row):
  config = _config(data_dir, tokens_per_row=tokens_per_row, examples_per_row=examples_per_row)
  L, K, B = tokens_per_row, examples_per_row, 8
  batch = next(iter(pipeline.make_dataset(config, split="validation", seed=0)))
  expected = dict(patches=((B, L, 12), np.float32), segment_ids=((B, L), np.int32),
                  positions=((B, L, 3), np.int32), cond_mask=((B, L), np.bool_),
                  grid=((B, K, 3), np.int32), example_ids=((B, K), np.int64), labels=((B, K), np.int32))
  assert batch["captions"].shape == (B, K) and batch["captions"].dtype.kind == "U"
  np.testing.assert_array_equal(batch["skipped"], np.zeros((B, len(packing.SKIP_REASONS))))
  assert {k: (v.shape, v.dtype) for k, v in batch.items() if k not in packing.HOST_KEYS} == expected
  assert batch["patches"].min() >= -1.0 and batch["patches"].max() <= 1.0
  assert batch["patches"].min() < -0.4 and batch["patches"].max() > 0.5  # dark canvases, bright ink
  assert not batch["cond_mask"].any()
  stats = packing.batch_stats(batch)
  assert stats["real_tokens"] == 64 * stats["examples"]  # every 16 px image is 8x8 = 64 tokens
  assert stats["examples"] == B * min(K, L // 64)
  real = batch["example_ids"] >= 0
  np.testing.assert_array_equal(batch["grid"][real], np.tile([1, 8, 8], (int(real.sum()), 1)))
  # Patches are the source pixels: unpatchify row 0 and compare with the stored image.
  source = sources.open_source("digits_canvas", "validation", data_dir, image_size=16)
  stored = {int(ex["id"]): i for i, ex in enumerate(source.__getitems__(range(len(source))))}
  part = packing.split_row({k: v[0] for k, v in batch.items()})[0]
  image = patches.unpatchify(part["patches"], part["grid"], (1, 2, 2), 3)
  original = source[stored[part["id"]]]
  np.testing.assert_allclose(image, original["video"] / 127.5 - 1.0, atol=1e-6)
  assert part["label"] == original["label"] and part["caption"] == original["caption"].decode()


def test_process_shards_are_disjoint_and_cover_one_epoch(data_dir):
  config = _config(data_dir, tokens_per_row=192, examples_per_row=3)
  seen = []
  for process_index in range(2):
    dataset = pipeline.make_dataset(config, split="validation", process_index=process_index,
                                    process_count=2, seed=0, num_epochs=1, drop_remainder=False)
    ids = []
    for batch in dataset:
      assert batch["example_ids"].shape == (4, 3)  # 8 rows over 2 processes; short tail padded
      ids.extend(int(i) for i in batch["example_ids"].ravel() if i >= 0)
    assert len(ids) == len(set(ids)) == 500
    seen.append(set(ids))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(1000))
  with pytest.raises(ValueError, match="global_batch=8 is not divisible by process_count=3"):
    pipeline.make_dataset(config, split="validation", process_index=0, process_count=3)


def _assert_same_batches(first, second):
  for want, got in zip(first, second, strict=True):
    for key in want:
      np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)


def test_pipeline_resumes_from_state_and_from_orbax(data_dir, tmp_path):
  config = _config(data_dir, tokens_per_row=160, examples_per_row=3)
  dataset = pipeline.make_dataset(config, split="train", seed=3)
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))

  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(4)]

  resumed = iter(dataset)
  resumed.set_state(state)
  _assert_same_batches(expected, [next(resumed) for _ in range(4)])

  restored = iter(pipeline.make_dataset(config, split="train", seed=3))
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same_batches(expected, [next(restored) for _ in range(4)])
  manager.close()


def test_make_global_batch_shards_rows_over_data_axes(data_dir):
  config = _config(data_dir)
  local = next(iter(pipeline.make_dataset(config, split="validation", seed=0)))
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:8])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  batch = pipeline.make_global_batch(local, sharding)
  assert set(batch) == set(local) - {"captions", "skipped"}  # host-only keys stay behind
  for key, value in batch.items():
    # int64 example ids become int32 on device unless jax_enable_x64 is set.
    assert value.shape == local[key].shape and value.dtype == jax.dtypes.canonicalize_dtype(local[key].dtype)
    assert value.sharding == sharding
    np.testing.assert_array_equal(np.asarray(value), local[key])
  # One row per device along the leading axis; the other axes whole.
  shard_shapes = {s.data.shape for s in batch["patches"].addressable_shards}
  assert shard_shapes == {(1, 64, 12)}


def test_worker_processes_give_the_same_batches(data_dir):
  in_process = iter(pipeline.make_dataset(_config(data_dir), split="validation", seed=0))
  expected = [next(in_process) for _ in range(3)]
  workers = iter(pipeline.make_dataset(_config(data_dir, num_workers=1), split="validation", seed=0))
  try:
    _assert_same_batches(expected[:1], [next(workers)])
    state = json.loads(json.dumps(workers.get_state()))
    _assert_same_batches(expected[1:], [next(workers) for _ in range(2)])
  finally:
    workers.close()
  resumed = iter(pipeline.make_dataset(_config(data_dir, num_workers=1), split="validation", seed=0))
  try:
    resumed.set_state(state)
    _assert_same_batches(expected[1:], [next(resumed) for _ in range(2)])
  finally:
    resumed.close()


def test_main_thread_reads_give_the_same_batches(data_dir):
  threads = iter(pipeline.make_dataset(_config(data_dir), split="validation", seed=0))
  main_thread = iter(pipeline.make_dataset(_config(data_dir, read_threads=0), split="validation", seed=0))
  _assert_same_batches([next(threads) for _ in range(3)], [next(main_thread) for _ in range(3)])
  with pytest.raises(ValueError, match="data.read_threads must be >= 0, got -1"):
    pipeline.make_dataset(_config(data_dir, read_threads=-1), split="validation", seed=0)


def test_cached_examples_give_the_same_batches_and_read_each_record_once(data_dir, monkeypatch):
  config = _config(data_dir, tokens_per_row=192, examples_per_row=3)
  reads = []

  class CountingSource:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, index):
      reads.append(index)
      return self.source[index]

  open_source = sources.open_source
  monkeypatch.setattr(sources, "open_source", lambda *a, **k: CountingSource(open_source(*a, **k)))
  batches = {}
  for cache in (False, True):
    config.data.cache_examples = cache
    reads.clear()
    dataset = pipeline.make_dataset(config, split="validation", process_index=1, process_count=2, seed=0,
                                    num_epochs=2, drop_remainder=False)
    batches[cache] = list(dataset)
    counts = np.bincount(reads, minlength=1000)
    assert set(np.nonzero(counts)[0]) == set(range(1, 1000, 2))  # this process's shard only
    assert set(counts[1::2]) == ({1} if cache else {2})  # two epochs: read once when cached
  _assert_same_batches(batches[False], batches[True])
