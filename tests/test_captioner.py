"""The CoCa-style captioner (configs/captioner.py) and the `recaption` command.

One smoke captioner is trained per module (in the one loop) and shared by the
recaption tests.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import __main__ as cli
from diffusion_jax import config as config_lib
from diffusion_jax import encode, inference, recaption, sample
from diffusion_jax.data import encoded, moving_digits, pipeline, sources
from diffusion_jax.models import captioner as captioner_lib
from diffusion_jax.train import captioner_task, loop

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "captioner.py")


def _smoke_config(data_dir, **train):
  config = config_lib.load_config(f"{CONFIG}:smoke")
  config.data.data_dir = data_dir
  config.train.update(train)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir, data_dir) of the smoke captioner trained 150 steps."""
  data_dir = str(tmp_path_factory.mktemp("captioner_data"))
  workdir = str(tmp_path_factory.mktemp("captioner_run"))
  config = _smoke_config(data_dir, steps=150, log_every=10, ckpt_every=150, eval_every=150)
  sources.ensure_dataset("moving_digits", data_dir, **pipeline.builder_kwargs(config.data))
  loop.train(config, workdir, media_sampler=sample.media_sampler)  # as the train command calls it
  return config, workdir, data_dir


def test_vocabulary_covers_the_generator_and_round_trips():
  vocab = captioner_lib.CaptionVocabulary(captioner_lib.caption_token_ids(), 24)
  rng = np.random.default_rng(0)
  images, labels = rng.uniform(size=(10, 8, 8)), np.arange(10)
  captions = [moving_digits.render_moving_digits(images, labels, np.random.default_rng(i), min_side=24, max_side=40,
                                                 max_digits=1, durations=(1, 5, 9))["caption"] for i in range(50)]
  rows = vocab.encode(captions)
  assert (rows[:, 0] == captioner_lib.BOS).all() and ((rows == captioner_lib.EOS).sum(1) == 1).all()
  assert vocab.decode(rows) == captions
  with pytest.raises(ValueError, match="outside the captioner's vocabulary.*purple"):
    vocab.encode(["a purple 3 on a black background"])
  with pytest.raises(ValueError, match="model.max_length is 24"):
    vocab.encode([" and ".join(["a red 3"] * 10)])


def test_prepare_clip_keeps_scale_and_marks_real_pixels():
  video = np.full((3, 10, 20, 3), 200, np.uint8)
  pixels, mask = captioner_lib.prepare_clip(video, canvas=24, frames=5)
  assert pixels.shape == (5, 24, 24, 3) and mask.shape == (5, 24, 24)
  assert mask[:3].sum() == 3 * 10 * 20 and mask[3:].sum() == 0  # no upscaling; missing frames are empty
  assert (pixels[:3] == 200).all() and (pixels[3:] == 0).all()  # padded with the background colour
  big = np.full((12, 48, 96, 3), 7, np.uint8)  # scaled down to fit, aspect kept, first 5 frames
  pixels, mask = captioner_lib.prepare_clip(big, canvas=24, frames=5)
  assert mask.sum() == 5 * 12 * 24
  with pytest.raises(ValueError, match="uint8"):
    captioner_lib.prepare_clip(big.astype(np.float32), canvas=24, frames=5)


def test_clip_inputs_find_the_digit_and_its_move():
  """A 4 x 4 white square moving 2 px right per frame on a 12 x 20 canvas (shorter side 12)."""
  video = np.zeros((3, 12, 20, 3), np.uint8)
  for t in range(3):
    video[t, 4:8, 2 + 2 * t:6 + 2 * t] = 255
  pixels, mask = captioner_lib.prepare_clip(video, canvas=24, frames=5)
  crops, geometry = captioner_task.clip_inputs(pixels[None], mask[None], 8)
  assert crops.shape == (1, 5, 8, 8, 3) and geometry.shape == (1, 5, captioner_task.GEOMETRY_FEATURES)
  g = np.asarray(geometry[0])
  np.testing.assert_allclose(g[:3, 0], 6 / 12, atol=1e-5)  # centroid y: row 6 of 12
  np.testing.assert_allclose(g[:3, 1], np.array([4, 6, 8]) / 12, atol=1e-5)  # centroid x moves 2 px a frame
  np.testing.assert_allclose(g[:3, 5:7], [[1, 20 / 12]] * 3, atol=1e-5)  # canvas height, width
  np.testing.assert_allclose(g[:3, 8], [0, captioner_task.MOVE_SCALE * 2 / 12, captioner_task.MOVE_SCALE * 2 / 12],
                             atol=1e-5)
  assert (g[:3, 9] == 1).all() and (g[3:] == 0).all() and (np.asarray(crops[0, 3:]) == 0).all()


def test_greedy_and_beam_decoding_are_well_formed():
  config = config_lib.load_config(f"{CONFIG}:smoke")
  model = captioner_task.build_model(config)
  params = captioner_task.init_params(model, config, jax.random.PRNGKey(1))
  m = config.model
  pixels = jax.random.randint(jax.random.PRNGKey(2), (3, m.frames, m.canvas, m.canvas, 3), 0, 255).astype(jnp.uint8)
  crops, geometry = captioner_task.clip_inputs(pixels, jnp.ones(pixels.shape[:-1], jnp.uint8), m.crop)
  tokens = model.apply({"params": params}, crops, geometry, method=captioner_lib.Captioner.encode_video)
  greedy = np.asarray(jax.jit(lambda p, t: captioner_lib.greedy_decode(model, p, t, m.max_length))(params, tokens))
  beams = [np.asarray(jax.jit(lambda p, t, k=k: captioner_lib.beam_decode(model, p, t, m.max_length, k))(params, tokens))
           for k in (1, 3)]
  for rows in [greedy] + beams:
    assert rows.shape == (3, m.max_length) and (rows[:, 0] == captioner_lib.BOS).all()
    for row in rows:  # exactly one EOS, real tokens before it, PAD after it
      end = list(row).index(captioner_lib.EOS)
      assert (row[end + 1:] == captioner_lib.PAD).all()
      assert not np.isin(row[1:end], [captioner_lib.PAD, captioner_lib.BOS, captioner_lib.EOS]).any()
  np.testing.assert_array_equal(beams[0], greedy)  # one beam is greedy decoding


def test_losses_fall_and_captions_parse(trained):
  config, workdir, data_dir = trained
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logs = [json.loads(line) for line in f if '"caption_loss"' in line]
  first, last = logs[0], logs[-1]
  assert last["step"] == 150
  assert last["caption_loss"] < 0.5 * first["caption_loss"]
  assert last["contrastive_loss"] < first["contrastive_loss"]
  captioner = inference.load_captioner(workdir)
  source = sources.open_source("moving_digits", "validation", data_dir, **pipeline.builder_kwargs(config.data))
  videos = [np.asarray(source[i]["video"]) for i in range(len(source))]
  for beams in (1, 3):
    captions = captioner.caption(videos, beams=beams, batch_size=8)
    assert len(captions) == len(videos)
    parsed = [moving_digits.caption_attributes(c) for c in captions]
    assert all(p is not None for p in parsed), captions  # the smoke model already writes the grammar
  with pytest.raises(ValueError, match="not a captioner"):
    captioner_task.LoadedCaptioner(ml_collections.ConfigDict({"task": "dit"}), None, 0)


def test_recaption_writes_a_readable_dataset(trained, tmp_path):
  config, workdir, data_dir = trained
  out = str(tmp_path / "recaptioned")
  builder = pipeline.builder_kwargs(config.data)
  assert cli.main(["recaption", f"--captioner={workdir}", "--source=moving_digits", f"--data-dir={data_dir}",
                   f"--builder={json.dumps(builder)}", "--splits=validation", "--batch-size=8",
                   f"--out={out}"]) == 0
  source = sources.open_source("moving_digits", "validation", data_dir, **builder)
  written = sources.open_source(out, "validation")
  assert len(written) == len(source) == 16
  captioner = inference.load_captioner(workdir)
  expected = captioner.caption([np.asarray(source[i]["video"]) for i in range(len(source))], batch_size=8)
  for i in range(len(source)):
    a, b = source[i], written[i]
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_array_equal(a["centers"], b["centers"])
    assert b["original_caption"] == a["caption"] and b["caption"].decode() == expected[i] and b["id"] == a["id"]
  # a rerun finds the split complete and writes nothing
  before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if "array_record" in f}
  recaption.recaption_dataset("moving_digits", "validation", data_dir, out, captioner=captioner,
                              builder_kwargs=builder, batch_size=8)
  assert {f: os.path.getmtime(os.path.join(out, f)) for f in before} == before


def test_recaption_killed_midway_is_not_readable_then_resumes(trained, tmp_path, monkeypatch):
  config, workdir, data_dir = trained
  builder = pipeline.builder_kwargs(config.data)
  captioner = inference.load_captioner(workdir)
  out = str(tmp_path / "interrupted")
  real, calls = recaption.recaption_examples, []

  def dies_on_second_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed midway")
    return real(*args, **kwargs)

  monkeypatch.setattr(recaption, "recaption_examples", dies_on_second_batch)
  with pytest.raises(KeyboardInterrupt):
    recaption.recaption_dataset("moving_digits", "train", data_dir, out, captioner=captioner,
                                builder_kwargs=builder, batch_size=8)
  assert encoded.complete_splits(out) == [] and not os.path.exists(os.path.join(out, "dataset_info.json"))
  with pytest.raises(ValueError, match="not a prepared tfds dataset"):
    sources.open_source(out, "train")
  assert not [f for f in os.listdir(out) if "array_record" in f]  # no shard-like file left
  monkeypatch.setattr(recaption, "recaption_examples", real)
  recaption.recaption_dataset("moving_digits", "train", data_dir, out, captioner=captioner,
                              builder_kwargs=builder, batch_size=8)
  assert encoded.complete_splits(out) == ["train"] and len(sources.open_source(out, "train")) == 64


def _dataset_without_video(path: str) -> None:
  features = tfds.features.FeaturesDict({"id": tfds.features.Scalar(dtype=np.int64), "caption": tfds.features.Text()})
  settings = {"content": "captions only"}
  encode.write_split(path, settings, features, "train", 0, 1, 3, name="no_video", description="captions only",
                     write=lambda p, indices: encode.write_records(
                         p, features, ({"id": i, "caption": f"caption {i}"} for i in indices)))


def test_recaption_of_a_dataset_without_video_is_a_clear_error(trained, tmp_path, capsys):
  _, workdir, _ = trained
  source = str(tmp_path / "no_video")
  _dataset_without_video(source)
  assert len(sources.open_source(source, "train")) == 3
  out = str(tmp_path / "out")
  assert cli.main(["recaption", f"--captioner={workdir}", f"--source={source}", "--splits=train",
                   f"--out={out}"]) == 2
  assert "no video to caption" in capsys.readouterr().err
  assert not os.path.exists(out)  # nothing written
