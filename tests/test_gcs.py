"""gs:// end to end, offline: a local GCS emulator (gcp-storage-emulator, tests/gcs_emulator.py) and
gcsfs. A run whose workdir is a bucket is killed and resumed bitwise as a local one, exported to the
bucket, loaded and sampled from there; a VAE's latent statistics survive checkpoint and export.
The data stay local (ArrayRecord reads against this emulator fail: it answers suffix range
requests with the whole object)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import jax
import numpy as np
import pytest

from diffusion_jax import checkpoint, export as export_lib, inference, paths
from diffusion_jax import sample as sample_lib
from diffusion_jax.train import loop
from test_resilience import _train_cli, _tree_equal, smoke_config

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

EMULATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """A function returning a fresh gs://bucket per call (the emulator ignores listing offsets, so
  runs must not share one) on an emulator that lives for this module (its log: emulator.log)."""
  port = _free_port()
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
  proc = subprocess.Popen([sys.executable, EMULATOR, str(port)], stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  # All five together: with one missing, a library reaches for the real endpoint or the GCE
  # metadata server and hangs. google-auth compares NO_GCE_CHECK with "true" (lowercase).
  env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
             CLOUD_STORAGE_EMULATOR_ENDPOINT=url, NO_GCE_CHECK="true")
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    from google.auth.compute_engine import _metadata  # read NO_GCE_CHECK when first imported
    _metadata._NO_GCE_CHECK = True
  except ImportError:
    pass
  import gcsfs
  gcsfs.GCSFileSystem.clear_instance_cache()  # an instance cached before this fixture knows no emulator
  deadline = time.time() + 120
  while True:
    try:
      urllib.request.urlopen(url + "/", timeout=2).read()
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"the GCS emulator did not start on {url}")
      time.sleep(0.2)

  def make() -> str:
    name = f"b{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=30).read()
    return f"gs://{name}"

  yield make
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  gcsfs.GCSFileSystem.clear_instance_cache()
  proc.terminate()
  proc.wait(timeout=30)
  log.close()


def test_gcs_workdir_kill_resume_export_and_sample(data_dir, bucket, tmp_path):
  overrides = ("train.steps=6", "train.ckpt_every=2", "train.log_every=2")
  straight, _ = loop.train(smoke_config(data_dir, *overrides), str(tmp_path / "straight"))

  run = bucket() + "/run"
  killed = _train_cli(run, data_dir, overrides, "4:SIGKILL")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not os.path.exists("gs:"), "a gs:// workdir was written to a local folder"
  committed = [s for s in (2, 4) if paths.exists(f"{run}/checkpoints/{s}/_CHECKPOINT_METADATA")]
  assert committed, paths.listdir(f"{run}/checkpoints")
  resumed, _ = loop.train(smoke_config(data_dir, *overrides), run)
  _tree_equal(resumed.params, straight.params)
  _tree_equal(resumed.opt_state, straight.opt_state)

  # What a run writes besides checkpoints: metrics (whole, though objects cannot be appended to),
  # TensorBoard events, and every kept step sealed with its sha256 manifest.
  logged = [json.loads(line)["step"] for line in paths.read_text(f"{run}/metrics.jsonl").splitlines()]
  assert logged[:2] == [2, 4] and logged[-1] == 6, logged  # the killed run's lines kept, then the rest
  assert any(n.startswith("events.out.tfevents") for n in paths.listdir(f"{run}/tensorboard"))
  manager = checkpoint.make_manager(run, keep=3, create=False)
  try:
    assert manager.latest_step() == 6 and checkpoint.verify(manager, 6)
  finally:
    manager.close()

  out = bucket() + "/export"
  assert export_lib.export(run, out) == out
  loaded = export_lib.load_export(out)
  _tree_equal(loaded.params, resumed.ema_params)
  assert loaded.info["files"]["config.json"]["sha256"] == paths.sha256(f"{out}/config.json")

  gen = inference.load_generator(out)
  grid = sample_lib.run_class_grid(gen, f"{out}/samples", per_class=1, steps=2, sampler="ddim")
  assert grid == f"{out}/samples/grid.png" and paths.size(grid) > 0
  assert len(paths.read_text(f"{out}/samples/samples.jsonl").splitlines()) == gen.config.model.num_classes


def test_vae_latent_stats_survive_gcs_checkpoint_and_export(smoke_vae, bucket):
  """The statistics a VAE saves as a checkpoint extra (what latent datasets are normalised with)
  are read back from a gs:// checkpoint and carried into a gs:// export."""
  _, local_workdir = smoke_vae
  run = bucket() + "/vae"
  paths.copytree(local_workdir, run)
  manager = checkpoint.make_manager(run, keep=1, create=False)
  try:
    step = manager.latest_step()
    stats = checkpoint.saved_extras(manager, step)["latent_stats"]
  finally:
    manager.close()
  assert len(stats["mean"]) == len(stats["std"]) > 0

  out = bucket() + "/vae_export"
  export_lib.export(run, out)
  assert export_lib.load_export(out).info["latent_stats"] == {k: list(stats[k]) for k in ("mean", "std")}
  vae = inference.load_vae(out)
  np.testing.assert_array_equal(vae.latent_stats["mean"], stats["mean"])
  local = inference.load_vae(local_workdir)
  np.testing.assert_array_equal(np.asarray(vae.latent_stats["std"]), np.asarray(local.latent_stats["std"]))
