"""Every test sees 8 fake CPU devices and shares a persistent compilation cache."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DIFFUSION_JAX_TEST_CACHE", os.path.expanduser("~/.cache/diffusion_jax/jit_tests")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """digits_canvas at 16 px, built once per test session and shared by all tests."""
  from diffusion_jax.data import sources

  path = str(tmp_path_factory.mktemp("data"))
  sources.ensure_dataset("digits_canvas", path, image_size=16)
  return path


@pytest.fixture(scope="session")
def smoke_vae(tmp_path_factory):
  """configs/vae_video.py:smoke trained 30 steps, once per session: (config, workdir).

  Shared by the VAE, evaluate and latent-diffusion tests (training it is the slow part)."""
  from diffusion_jax import config as config_lib
  from diffusion_jax.data import pipeline, sources
  from diffusion_jax.train import loop

  data = str(tmp_path_factory.mktemp("vae_data"))
  workdir = str(tmp_path_factory.mktemp("vae_run"))
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "vae_video.py") + ":smoke")
  config_lib.apply_overrides(config, [f"data.data_dir={data}", "train.steps=30", "train.ckpt_every=30",
                                      "train.lr=3e-3", "train.log_every=10", "train.eval_batches=2"])
  sources.ensure_dataset(config.data.name, data, **pipeline.builder_kwargs(config.data))
  loop.train(config, workdir)
  return config, workdir
