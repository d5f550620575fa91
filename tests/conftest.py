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
