"""Multi-host on localhost: 2 processes x 4 CPU devices through launch/local.py, against 1 process x 8.

The processes run a small driver (written below into tmp_path) that does what
`python -m diffusion_jax train` does on every host: distributed.initialize()
from the launcher's environment, check_agreement(config), loop.train.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from diffusion_jax import checkpoint, distributed, sharding
from diffusion_jax import config as config_lib
from diffusion_jax.data import pipeline, sources
from diffusion_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "dit_image.py") + ":smoke"
LAUNCHER = os.path.join(REPO, "launch", "local.py")
STEPS = 4
OVERRIDES = (f"train.steps={STEPS}", f"train.ckpt_every={STEPS}", "train.log_every=2", "mesh.shape=(8,1,1)")

DRIVER = textwrap.dedent("""
    import json, os, sys
    from diffusion_jax import distributed
    distributed.initialize()
    import jax
    from diffusion_jax import config as config_lib
    from diffusion_jax.data import pipeline
    from diffusion_jax.train import loop

    mode, spec, workdir, *overrides = sys.argv[1:]
    config = config_lib.load_config(spec)
    if mode == "disagree":  # process 1 trains with another seed
      overrides.append(f"train.seed={jax.process_index()}")
      def mark():  # what process 1 finds when its turn comes
        found = sorted(os.listdir(workdir))
        open(os.path.join(workdir, f"marker_{jax.process_index()}"), "w").close()
        return found
      os.makedirs(workdir, exist_ok=True)
      zero_first = distributed.process_zero_first(mark)
    config_lib.apply_overrides(config, overrides)
    report = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                  device_count=jax.device_count(), local_device_count=jax.local_device_count())
    try:
      report.update(distributed.check_agreement(config))
    except distributed.ProcessMismatch as e:
      report["mismatch"] = str(e)
    if mode == "train":
      seen = []  # the example ids this process read
      task = loop.TASKS[config.task]  # the loop reads its data through the task
      make_dataset = task.make_dataset
      def recording(*args, **kwargs):
        def record(batch):
          seen.extend(int(i) for i in batch["example_ids"].ravel() if i >= 0)
          return batch
        return make_dataset(*args, **kwargs).map(record)
      task.make_dataset = recording
      state, metrics = loop.train(config, workdir)
      report.update(loss=metrics["loss"], example_ids=seen, step=int(jax.device_get(state.step)))
    if mode == "disagree":
      report["zero_first"] = zero_first
    if mode == "epoch":  # one whole epoch of the eval split; every process's example ids gathered on all
      import numpy as np
      from jax.experimental import multihost_utils
      epoch = pipeline.make_dataset(config, split=config.data.eval_split, process_index=jax.process_index(),
                                    process_count=jax.process_count(), seed=config.data.shuffle_seed,
                                    num_epochs=1, drop_remainder=False)
      own = [int(i) for batch in epoch for i in batch["example_ids"].ravel() if i >= 0]
      width = int(np.max(multihost_utils.process_allgather(np.array([len(own)]))))
      padded = np.full((width,), -1, np.int64)
      padded[:len(own)] = own
      gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, width]
      report.update(own_ids=own, gathered_ids=[[int(i) for i in row if i >= 0] for row in gathered])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"process_{jax.process_index()}.json"), "w") as f:
      json.dump(report, f)
""")


def run_launcher(tmp_path, mode, workdir, *overrides, processes=2, devices=4, timeout=240):
  driver = tmp_path / "driver.py"
  driver.write_text(DRIVER)
  cmd = [sys.executable, LAUNCHER, f"--processes={processes}", f"--devices={devices}", "--init-timeout=60",
         f"--timeout={timeout}", "--", sys.executable, str(driver), mode, CONFIG, str(workdir), *overrides]
  # The children share the tests' persistent compilation cache (set in conftest.py).
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, cwd=REPO, env=env)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  reports = []
  for i in range(processes):
    with open(workdir / f"process_{i}.json") as f:
      reports.append(json.load(f))
  return reports, result.stdout


def _launcher():
  """launch/local.py as a module (launch/ is a folder of scripts, not a package)."""
  spec = importlib.util.spec_from_file_location("launch_local", LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _ConcatIterator:
  """The batches of several per-process iterators side by side: the global batch in one process."""

  def __init__(self, iterators):
    self._iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {str(i): it.get_state() for i, it in enumerate(self._iterators)}

  def set_state(self, state):
    for i, it in enumerate(self._iterators):
      it.set_state(state[str(i)])


def _tree_allclose(a, b, **tol):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _restore_params(config, workdir, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  _, _, _, abstract, shardings = loop.build_state(config, mesh, sharding.logical_rules(config.mesh))
  manager = checkpoint.make_manager(str(workdir), keep=3, create=False)
  assert manager.latest_step() == STEPS
  state = checkpoint.restore(manager, STEPS, checkpoint.abstract_with_shardings(abstract, shardings))
  manager.close()
  return state


def test_two_processes_train_like_one_and_restore_elastically(data_dir, tmp_path, monkeypatch):
  overrides = (f"data.data_dir={data_dir}", *OVERRIDES)
  multi_dir = tmp_path / "multi"
  start = time.time()
  reports, stdout = run_launcher(tmp_path, "train", multi_dir, *overrides)
  multi_seconds = time.time() - start
  assert [(r["process_index"], r["process_count"], r["device_count"], r["local_device_count"]) for r in reports] == \
      [(0, 2, 8, 4), (1, 2, 8, 4)]
  assert reports[0]["config_hash"] == reports[1]["config_hash"] and "mismatch" not in reports[0]
  assert all(r["step"] == STEPS for r in reports)

  # Each process read its own shard: 4 rows a step, none shared with the other process.
  ids0, ids1 = set(reports[0]["example_ids"]), set(reports[1]["example_ids"])
  assert len(reports[0]["example_ids"]) == len(reports[1]["example_ids"]) == STEPS * 4
  assert not ids0 & ids1
  config = config_lib.load_config(CONFIG)
  config_lib.apply_overrides(config, overrides)
  for report in reports:  # exactly the first batches of its shard, in order
    shard = iter(pipeline.make_dataset(config, split=config.data.split, process_index=report["process_index"],
                                       process_count=2, seed=config.data.shuffle_seed))
    expected = [int(i) for _ in range(STEPS) for i in next(shard)["example_ids"].ravel() if i >= 0]
    assert report["example_ids"] == expected
  # Both processes saved their data-iterator state into the one shared checkpoint.
  data_item = multi_dir / "checkpoints" / str(STEPS) / "data"
  assert sorted(f for f in os.listdir(data_item) if f.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]

  # The reference: 1 process x 8 devices fed the same global batches (both shards side by side).
  make_dataset = pipeline.make_dataset

  class BothShards:
    def __iter__(self):
      return _ConcatIterator([iter(make_dataset(config, split=config.data.split, process_index=i, process_count=2,
                                                seed=config.data.shuffle_seed)) for i in range(2)])

  monkeypatch.setattr(loop.TASKS[config.task], "make_dataset", lambda *a, **k: BothShards())
  start = time.time()
  single_state, single_metrics = loop.train(config, str(tmp_path / "single"))
  single_seconds = time.time() - start
  monkeypatch.undo()
  np.testing.assert_allclose(reports[0]["loss"], single_metrics["loss"], rtol=1e-4)
  assert reports[0]["loss"] == reports[1]["loss"]  # a replicated metric, the same on every host

  # The 2-process checkpoint restores on 1 process x 8 devices and, elastically, on 2 devices.
  restored8 = _restore_params(config, multi_dir, jax.devices())
  _tree_allclose(jax.device_get(restored8.params), jax.device_get(single_state.params), rtol=1e-4, atol=1e-6)
  two = config_lib.from_json(config_lib.to_json(config))
  two.mesh.shape = (1, 2, 1)
  restored2 = _restore_params(two, multi_dir, jax.devices()[:2])
  assert restored2.params["final_layer"]["linear"]["kernel"].sharding.mesh.shape["fsdp"] == 2
  _tree_allclose(jax.device_get(restored2), jax.device_get(restored8), rtol=0, atol=0)
  # The data iterator on 1 process: the 2-process states do not apply, so it skips STEPS batches of its shard.
  manager = checkpoint.make_manager(str(multi_dir), keep=3, create=False)
  assert distributed.saved_process_count(manager, STEPS) == 2
  resumed = iter(make_dataset(config, split=config.data.split, seed=config.data.shuffle_seed))
  assert distributed.resume_data_iterator(manager, STEPS, resumed) == "skipped"
  fresh = iter(make_dataset(config, split=config.data.split, seed=config.data.shuffle_seed))
  for _ in range(STEPS):
    next(fresh)
  np.testing.assert_array_equal(next(resumed)["example_ids"], next(fresh)["example_ids"])
  manager.close()
  print(f"2x4 run through the launcher: {multi_seconds:.1f}s, 1x8 run: {single_seconds:.1f}s")


def test_one_epoch_over_two_processes_reads_every_example_exactly_once(data_dir, tmp_path):
  """Issue 3's exactly-once audit: 2 processes x 4 devices each read their shard of one
  whole epoch (num_epochs=1, the last short batch padded); the ids gathered from
  both are the split's ids, each once."""
  overrides = (f"data.data_dir={data_dir}", "data.examples_per_row=2", "mesh.shape=(8,1,1)")
  reports, _ = run_launcher(tmp_path, "epoch", tmp_path / "run", *overrides)
  config = config_lib.load_config(CONFIG)
  config_lib.apply_overrides(config, overrides)
  source = sources.open_source(config.data.name, config.data.eval_split, data_dir,
                               **pipeline.builder_kwargs(config.data))
  split_ids = sorted(int(source[i]["id"]) for i in range(len(source)))
  assert len(split_ids) == len(set(split_ids)) > 0

  own = [r["own_ids"] for r in reports]
  assert own[0] and own[1] and not set(own[0]) & set(own[1])
  assert reports[0]["gathered_ids"] == reports[1]["gathered_ids"] == own  # all_gather in process order
  union = own[0] + own[1]
  assert len(union) == len(set(union))  # no example read twice
  assert sorted(union) == split_ids  # and none missed


def test_processes_that_disagree_on_the_config_stop_before_any_step_and_zero_goes_first(data_dir, tmp_path):
  reports, _ = run_launcher(tmp_path, "disagree", tmp_path / "run", f"data.data_dir={data_dir}", *OVERRIDES,
                            processes=2, devices=1)
  for r in reports:  # every process sees both values, so all of them stop
    message = r["mismatch"]
    assert "disagree on the config" in message and "config_hash" in message
    assert "process 0: " in message and "process 1: " in message
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  # process_zero_first: process 0 ran first, alone; process 1 ran after it.
  assert reports[0]["zero_first"] == [] and reports[1]["zero_first"] == ["marker_0"]


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout():
  address = f"127.0.0.1:{_launcher().free_port()}"
  start = time.time()
  with pytest.raises(distributed.CoordinatorUnreachable, match=f"process 1 of 2 could not reach the coordinator "
                                                              f"at {address} within 1s"):
    distributed.initialize(coordinator=address, num_processes=2, process_id=1, timeout_s=1)
  assert time.time() - start < 10
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    distributed.initialize(coordinator=address)
  with pytest.raises(ValueError, match="process_id=2 is not in"):
    distributed.initialize(coordinator=address, num_processes=2, process_id=2)


def test_code_version_follows_the_source(tmp_path):
  package = tmp_path / "pkg"
  package.mkdir()
  (package / "a.py").write_text("x = 1\n")
  first = distributed.code_version(str(package))
  assert first == distributed.code_version(str(package)) and len(first) == 16
  (package / "a.py").write_text("x = 2\n")
  assert distributed.code_version(str(package)) != first
  assert distributed.code_version() == distributed.code_version(distributed.PACKAGE_DIR)


def test_data_iterator_of_the_same_process_count_is_restored_exactly(data_dir, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  config = config_lib.load_config(CONFIG)
  config_lib.apply_overrides(config, [f"data.data_dir={data_dir}"])
  dataset = pipeline.make_dataset(config, split=config.data.split, seed=config.data.shuffle_seed)
  saved = iter(dataset)
  for _ in range(3):
    next(saved)
  manager = checkpoint.make_manager(str(tmp_path), keep=1)
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(saved)))
  manager.wait_until_finished()
  assert distributed.saved_process_count(manager, 3) == 1
  resumed = iter(dataset)
  assert distributed.resume_data_iterator(manager, 3, resumed) == "restored"
  np.testing.assert_array_equal(next(resumed)["example_ids"], next(saved)["example_ids"])
  manager.close()


def test_launcher_ends_the_others_when_one_fails_and_sets_the_environment(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(textwrap.dedent("""
      import os, sys, time
      keys = ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "LOCAL_DEVICES")
      print(" ".join(os.environ["DIFFUSION_JAX_" + k] for k in keys), os.environ["XLA_FLAGS"], flush=True)
      if os.environ["DIFFUSION_JAX_PROCESS_ID"] == "1":
        sys.exit(3)
      time.sleep(120)  # process 0 would wait for process 1 forever
  """))
  start = time.time()
  result = subprocess.run([sys.executable, LAUNCHER, "--processes=2", "--devices=3", "--", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert result.returncode == 3, result.stdout + result.stderr
  assert time.time() - start < 30
  lines = result.stdout.splitlines()
  assert "launch: a process exited with status 3; ending the others" in lines
  for i in range(2):
    line = next(l for l in lines if l.startswith(f"[{i}] 127.0.0.1:"))
    assert line.split()[2:] == ["2", str(i), "3", "--xla_force_host_platform_device_count=3"], line
