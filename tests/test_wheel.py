"""The package as a user installs it: a wheel (not -e) in a fresh venv, run from another directory.

The venv sees this interpreter's site-packages (--system-site-packages) for jax and the other
dependencies; the wheel itself is installed with --no-deps. The full `quickstart --scale=0.05`
takes minutes and is run by hand (README); here every shipped recipe loads and a smoke config
trains two steps through the installed CLI.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py") and f != "__init__.py")
SMOKE_ARGS = {"ldm_digits.py": "smoke,data=/an/encoded/dataset"}  # the LDM recipe needs its latent dataset named


def _run(argv, cwd, env=None, timeout=600):
  result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
  return result.stdout


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory):
  root = tmp_path_factory.mktemp("wheel")
  source = root / "source"  # a copy: building in place would leave build/ and egg-info in the checkout
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", "quickstart_out"))
  dist = root / "dist"
  _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(dist)],
       cwd=root)
  wheels = list(dist.glob("diffusion_jax-*.whl"))
  assert len(wheels) == 1, wheels
  _run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], cwd=root)
  python = str(root / "venv" / "bin" / "python")
  _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])], cwd=root)
  return python, root


def test_installed_package_finds_its_recipes(venv_python):
  python, root = venv_python
  elsewhere = root / "elsewhere"
  elsewhere.mkdir()
  script = textwrap.dedent(f"""
      import os
      import diffusion_jax
      from diffusion_jax import config as config_lib
      assert "site-packages" in diffusion_jax.__file__, diffusion_jax.__file__
      for name in {RECIPES!r}:
        path = config_lib.recipe_path(name)
        assert path.startswith(os.path.dirname(diffusion_jax.__file__)), path
        arg = {SMOKE_ARGS!r}.get(name, "smoke")
        config = config_lib.load_config("configs/" + name + ":" + arg)  # the README's form, from elsewhere
        assert config.task, name
      print("recipes", len({RECIPES!r}))
  """)
  out = _run([python, "-c", script], cwd=elsewhere)
  assert f"recipes {len(RECIPES)}" in out


def test_installed_cli_trains_a_smoke_config(venv_python, data_dir):
  python, root = venv_python
  workdir = root / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  _run([python, "-m", "diffusion_jax", "train", "--config=configs/dit_image.py:smoke", f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}", "--config.train.steps=2", "--config.train.ckpt_every=2"],
       cwd=root, env=env)
  assert os.path.isfile(workdir / "metrics.jsonl")
  assert os.listdir(workdir / "checkpoints")
