"""TensorBoard media: at eval steps the loop writes samples of fixed classes or prompts beside the scalars."""
import glob
import os
import struct

import imageio.v3 as iio
import numpy as np
from tensorboardX.proto import event_pb2

from diffusion_jax import config as config_lib
from diffusion_jax import inference, media, metrics, sample, sharding
from diffusion_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_images(workdir):
  """{(tag, step): decoded uint8 frames [T, H, W, C]} of every image summary in the run's event files."""
  found = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # TFRecord: length u64, its crc u32, the record, its crc u32
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        if value.HasField("image"):
          pictures = np.asarray(iio.imread(value.image.encoded_image_string, index=None))
          found[(value.tag, event.step)] = pictures if pictures.ndim == 4 else pictures[None]
  return found


def test_eval_steps_write_a_class_grid_of_the_ema_params(data_dir, tmp_path):
  config = config_lib.load_config(os.path.join(REPO, "configs", "dit_image.py") + ":smoke")
  config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", "train.steps=4", "train.eval_every=2",
                                      "train.eval_batches=1", "train.ckpt_every=4", "sample.steps=3"])
  workdir = str(tmp_path / "run")
  loop.train(config, workdir, media_sampler=sample.media_sampler)
  images = read_images(workdir)
  assert sorted(images) == [("samples/classes", 2), ("samples/classes", 4)]
  grid = images[("samples/classes", 4)]
  assert grid.shape == (1, 20, 182, 3)  # 10 classes of 16 px in a row, 2 px gutters
  assert not np.array_equal(grid, images[("samples/classes", 2)])  # other params, other pictures

  # The same grid from the step-4 checkpoint's EMA params, sampled as `sample` would.
  gen = inference.load_generator(workdir)
  with sharding.activate(sharding.data_mesh(config.mesh), sharding.logical_rules(config.mesh)):
    expected = sample.sample_classes(gen, list(range(10)), sampler=config.sample.sampler, steps=3,
                                     cfg_scale=config.sample.cfg_scale, seed=config.sample.seed)
  assert np.abs(grid[0].astype(int) - media.grid(expected, columns=10).astype(int)).mean() < 1.0

  quiet = str(tmp_path / "quiet")
  config_lib.apply_overrides(config, ["train.eval_media=False", "train.steps=2"])
  loop.train(config, quiet, media_sampler=sample.media_sampler)
  assert read_images(quiet) == {}


def test_write_media_stores_a_clip_as_an_animated_gif_and_an_image_as_a_png(tmp_path):
  clip = np.zeros((4, 12, 16, 3), np.uint8)
  for t in range(4):
    clip[t, 2:6, 3 * t:3 * t + 4] = (255, 40, 40)
  writer = metrics.MetricWriter(str(tmp_path), 10)
  writer.write_media(7, {"samples/0: a red square": clip, "samples/still": clip[:1]})
  writer.close()
  images = read_images(str(tmp_path))
  np.testing.assert_array_equal(images[("samples/0: a red square", 7)], clip)
  np.testing.assert_array_equal(images[("samples/still", 7)], clip[:1])
  silent = metrics.MetricWriter(str(tmp_path / "other"), 10, enabled=False)
  silent.write_media(1, {"x": clip})  # a process other than 0 writes nothing
  assert not os.path.exists(tmp_path / "other")
