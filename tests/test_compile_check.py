"""launch/compile_check.py: the real train step compiled by libtpu for a described TPU slice, on this CPU machine."""
import importlib.util
import io
import os

import pytest

from diffusion_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "dit_image.py")


def _compile_check():
  """launch/compile_check.py as a module (launch/ is a folder of scripts, not a package)."""
  spec = importlib.util.spec_from_file_location("compile_check", os.path.join(REPO, "launch", "compile_check.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


cc = _compile_check()
has_libtpu = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not has_libtpu, reason="libtpu is not installed (pip install -e '.[tpu]')")


def test_topology_names():
  assert cc.topology_name("v5p-64") == "v5p:2x4x4"  # 64 TensorCores = 32 chips
  assert cc.topology_name("v5e-16") == "v5e:4x4"  # 16 chips
  assert cc.topology_name("v4:2x2x2") == "v4:2x2x2"
  assert cc.chip_count("v5p:2x4x4") == 32
  with pytest.raises(ValueError, match=r"unknown TPU topology 'v9-8'; valid: .*v5p-64.*v6e-8"):
    cc.topology_name("v9-8")


@needs_libtpu
def test_smoke_train_step_compiles_for_a_small_slice_and_fits():
  config = config_lib.load_config(CONFIG + ":smoke")
  config_lib.apply_overrides(config, ["mesh.shape=(2,2,1)"])
  out = io.StringIO()
  report = cc.check(config, "v5e-4", out=out)
  assert report["fits"] and 0 < report["peak_bytes"] < report["hbm_bytes"] == 16 * 2 ** 30
  table = dict(line.split(None, 1) if "  " not in line else [s.strip() for s in line.split("  ", 1)]
               for line in out.getvalue().splitlines())
  assert table["topology"].startswith("v5e-4 = v5e:2x2: 4 devices")
  assert table["mesh"] == "{'data': 2, 'fsdp': 2, 'tensor': 1}"
  assert table["fits"] == "yes" and "of 16.00 GiB HBM" in table["peak / device"]
  # Every layer counted (a scanned body alone would fall below the analytic model FLOPs, which count
  # them all); the compiled step does the model's work and little more (the smoke model is so narrow
  # that norms and softmax, which the model count leaves out, weigh in).
  assert table["FLOPs / step"].startswith(f"{report['flops']:.3e} (all devices")
  assert table["model FLOPs / step"].startswith(f"{report['model_flops']:.3e}")
  assert 1.0 <= report["flops"] / report["model_flops"] < 1.5
  assert table["compiled / model"] == f"{report['flops'] / report['model_flops']:.3f}"

  # A million rows a step cannot fit 16 GiB a device: reported as not fitting.
  big = config_lib.load_config(CONFIG + ":smoke")
  config_lib.apply_overrides(big, ["train.global_batch=1048576", "mesh.shape=(2,2,1)"])
  out = io.StringIO()
  report = cc.check(big, "v5e-4", out=out)
  assert not report["fits"] and "NO" in out.getvalue()


def test_bad_topology_is_one_error_line(capsys):
  assert cc.main(["--config=" + CONFIG + ":smoke", "--topology=v5p-7"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown TPU topology 'v5p-7'") and "\n" not in err


@needs_libtpu
def test_splash_attention_compiles_into_the_tpu_train_step():
  """The Pallas splash kernel lowers through Mosaic for a real TPU target, also with the sequence split
  (shard_map over the q shards, K/V whole): the compiled step holds the kernel's TPU custom calls."""
  config = config_lib.load_config(CONFIG + ":smoke")
  config_lib.apply_overrides(config, ["mesh.shape=(2,1,2)", "model.attention_backend=splash"])
  config.mesh.rules = tuple((name, {"length": "tensor", "heads": None}.get(name, axes))
                            for name, axes in config.mesh.rules)
  lowered, mesh, _ = cc.lower_train_step(config, cc.topology_devices(cc.topology_name("v5e-4")))
  compiled = cc.compile_for_topology(lowered)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  text = compiled.as_text()
  assert text.count("tpu_custom_call") >= 3  # forward, and the dq and dkv kernels of the backward pass
  assert 0 < cc.memory_report(compiled)["peak"] < 16 * 2 ** 30
