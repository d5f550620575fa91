"""The latent-diffusion chain through the CLI on smoke configs: a trained VAE -> `encode` ->
`train` an LDM (U-Net and DiT) cross-attending to captions -> `sample` decoded through the VAE."""
import json
import os

import numpy as np
import pytest

from diffusion_jax import __main__ as cli
from diffusion_jax import checkpoint
from diffusion_jax import inference

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "ldm_digits.py")
# 16 px images (one-frame videos) with captions; the smoke VAE makes 4 x 4 x 4 latents of them.
BUILD = dict(min_side=16, max_side=16, durations=(1,), max_digits=1, train_examples=12, validation_examples=4)


@pytest.fixture(scope="module")
def latents(smoke_vae, tmp_path_factory):
  _, vae_workdir = smoke_vae
  data_dir = str(tmp_path_factory.mktemp("ldm_data"))
  out = str(tmp_path_factory.mktemp("ldm_latents") / "latents")
  assert cli.main(["encode", "--source=moving_digits", f"--builder={json.dumps(BUILD)}", f"--data-dir={data_dir}",
                   f"--vae={vae_workdir}", f"--out={out}"]) == 0
  return out, vae_workdir


def _saved_config(workdir):
  manager = checkpoint.make_manager(workdir, keep=1, create=False)
  config = checkpoint.saved_config(manager)
  manager.close()
  return config


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_encode_train_and_sample_a_text_conditional_ldm(latents, family, tmp_path):
  data, vae_workdir = latents
  workdir, out = str(tmp_path / "ldm"), str(tmp_path / "samples")
  channels = inference.load_vae(vae_workdir).latent_channels
  assert cli.main(["train", f"--config={CONFIG}:smoke,data={data},family={family},latent_size=4,channels={channels}",
                   f"--workdir={workdir}"]) == 0
  losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))
            if "\"loss\"" in line]
  assert losses and np.isfinite(losses).all()

  # The run recorded what decodes its latents: the VAE and its statistics, the text encoder.
  config = _saved_config(workdir)
  vae = inference.load_vae(vae_workdir)
  assert config.model.family == family and config.latent.vae == os.path.abspath(vae_workdir)
  np.testing.assert_allclose(config.latent.mean, vae.latent_stats["mean"], rtol=1e-6)
  np.testing.assert_allclose(config.latent.std, vae.latent_stats["std"], rtol=1e-6)
  assert config.text.max_length == 32

  prompts = ["a red 3 moving quickly to the right", "a green 7"]
  assert cli.main(["sample", f"--workdir={workdir}", f"--out={out}", "--seed=3"]
                  + [f"--prompt={p}" for p in prompts]) == 0
  records = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
  assert [r["prompt"] for r in records] == prompts
  for i, record in enumerate(records):
    assert record["size_made"] == [16, 16] and record["frames_made"] == 1 and record["sampler"] == "euler"
    assert record["files"] == [f"sample_{i}.png", f"sample_{i}.npz"]
    with np.load(os.path.join(out, f"sample_{i}.npz")) as f:
      frames = f["frames"]
    assert frames.shape == (1, 16, 16, 3) and frames.dtype == np.uint8  # decoded through the VAE to pixels
  # Classifier-free guidance and the text change what is made.
  with np.load(os.path.join(out, "sample_0.npz")) as a, np.load(os.path.join(out, "sample_1.npz")) as b:
    assert np.any(a["frames"] != b["frames"])


def test_ldm_config_needs_an_encoded_dataset():
  from diffusion_jax import config as config_lib

  with pytest.raises(config_lib.ConfigError, match="needs data=<dir>"):
    config_lib.load_config(CONFIG + ":smoke")


def test_a_latent_size_the_dataset_does_not_have_is_named(latents, tmp_path, capsys):
  data, vae_workdir = latents
  workdir = tmp_path / "ldm"
  channels = inference.load_vae(vae_workdir).latent_channels
  assert cli.main(["train", f"--config={CONFIG}:smoke,data={data},family=unet,latent_size=8,channels={channels}",
                   f"--workdir={workdir}"]) == 2
  assert "data.image_size=8 but the latents of" in capsys.readouterr().err
  assert not os.path.exists(workdir / "checkpoints") or not os.listdir(workdir / "checkpoints")
