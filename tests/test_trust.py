"""Checkpoints you can trust: a sha256 manifest per step, a corrupt or partial newest step reported
and skipped for the newest good one, and a resume that refuses a changed dataset, VAE, text encoder
or optimizer unless the change is allowed by name."""
import os

import pytest

from diffusion_jax import checkpoint
from diffusion_jax.__main__ import main
from diffusion_jax.train import loop
from test_resilience import CONFIG, _tree_equal, smoke_config

OVERRIDES = ("train.steps=4", "train.ckpt_every=2", "train.log_every=2", "train.keep_ckpts=3")


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  """The smoke DiT trained 4 steps uninterrupted: (final state, workdir)."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  state, _ = loop.train(smoke_config(data_dir, *OVERRIDES), workdir)
  return state, workdir


def _copy_run(workdir, target):
  import shutil

  shutil.copytree(workdir, target)
  return str(target)


def _largest_state_file(step_dir):
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state")) for n in names]
  return max(files, key=os.path.getsize)


def _flip_one_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x01]))


def test_every_kept_step_is_sealed_and_a_flipped_byte_is_named(straight, tmp_path):
  workdir = _copy_run(straight[1], tmp_path / "run")
  manager = checkpoint.make_manager(workdir, keep=3, create=False)
  try:
    assert manager.all_steps() == [2, 4]
    assert checkpoint.verify(manager, 2) and checkpoint.verify(manager, 4)
    victim = _largest_state_file(os.path.join(workdir, "checkpoints", "4"))
    _flip_one_byte(victim)
    name = os.path.relpath(victim, os.path.join(workdir, "checkpoints", "4"))
    with pytest.raises(checkpoint.CorruptCheckpoint, match=f"step 4: {name} does not match its sha256"):
      checkpoint.verify(manager, 4)
  finally:
    manager.close()


def test_corrupt_newest_step_falls_back_to_the_newest_good_one(straight, data_dir, tmp_path, capfd):
  """One flipped byte in step 4's data: the resume warns naming step 4, restores step 2, deletes 4,
  and retrains steps 3-4 to exactly the uninterrupted run's state."""
  workdir = _copy_run(straight[1], tmp_path / "run")
  _flip_one_byte(_largest_state_file(os.path.join(workdir, "checkpoints", "4")))
  state, _ = loop.train(smoke_config(data_dir, *OVERRIDES), workdir)
  out, err = capfd.readouterr()
  assert "checkpoint step 4" in err and "does not match its sha256" in err and "falling back" in err, err
  assert f"resumed from step 2 in {workdir}" in out
  _tree_equal(state.params, straight[0].params)


def test_partial_unsealed_step_falls_back_too(straight, data_dir, tmp_path, capfd):
  """A step without its manifest (killed before sealing) whose data file is gone: Orbax's restore
  fails, the step is named and skipped."""
  workdir = _copy_run(straight[1], tmp_path / "run")
  step_dir = os.path.join(workdir, "checkpoints", "4")
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST_FILE))
  os.remove(_largest_state_file(step_dir))
  state, _ = loop.train(smoke_config(data_dir, *OVERRIDES), workdir)
  out, err = capfd.readouterr()
  assert "has no sha256.json" in err and "checkpoint step 4" in err and "corrupt or partial" in err, err
  assert f"resumed from step 2 in {workdir}" in out
  _tree_equal(state.params, straight[0].params)


def test_every_step_bad_is_an_error_naming_them(straight, data_dir, tmp_path):
  workdir = _copy_run(straight[1], tmp_path / "run")
  for step in (2, 4):
    _flip_one_byte(_largest_state_file(os.path.join(workdir, "checkpoints", str(step))))
  with pytest.raises(ValueError, match=r"every checkpoint .* is corrupt or partial: steps \[4, 2\]"):
    loop.train(smoke_config(data_dir, *OVERRIDES), workdir)


@pytest.mark.parametrize("override,field", [
    ("train.lr=5e-4", "train.lr"),
    ("train.weight_decay=0.1", "train.weight_decay"),
    ("data.name=moving_digits", "data.name"),
])
def test_resume_refuses_a_changed_run_unless_allowed(straight, data_dir, tmp_path, capsys, override, field):
  workdir = _copy_run(straight[1], tmp_path / "run")
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(checkpoint.CheckpointMismatch, match=f"{field}=.*--allow-change={field}"):
    loop.train(smoke_config(data_dir, *OVERRIDES, override), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing written
  if field == "train.lr":  # allowed by name through the command: it resumes (and has nothing left to do)
    code = main(["train", f"--config={CONFIG}:smoke", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                 *[f"--config.{o}" for o in OVERRIDES], f"--config.{override}", f"--allow-change={field}"])
    assert code == 0 and "resumed from step 4" in capsys.readouterr().out


def test_allow_change_names_only_run_fields(straight, data_dir, tmp_path):
  workdir = _copy_run(straight[1], tmp_path / "run")
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"--allow-change \['model.depth'\]"):
    loop.train(smoke_config(data_dir, *OVERRIDES), workdir, allow_changes=("model.depth",))
