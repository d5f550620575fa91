"""The quickstart's stages that the smoke tests do not reach (the whole command takes ~13 minutes and is
run by hand, README)."""
from diffusion_jax import checkpoint, quickstart
from diffusion_jax.data import sources
from diffusion_jax.data.moving_digits import QUICKSTART_DATA


def test_vae_second_stage_resumes_the_first_on_nine_frame_clips(tmp_path):
  data_dir, vae_dir = str(tmp_path / "data"), str(tmp_path / "vae")
  sources.ensure_dataset("moving_digits", data_dir, **QUICKSTART_DATA)
  quickstart.train_vae(data_dir, vae_dir, scale=0.01)  # 24 steps of 5-frame crops, then 3 of 9-frame clips

  manager = checkpoint.make_manager(vae_dir, keep=1, create=False)
  assert manager.latest_step() == 27
  saved = checkpoint.saved_config(manager, 27)
  assert (saved.data.frames, saved.data.min_frames) == (9, 9)
  assert (saved.train.lr, saved.train.lr_schedule) == (1e-5, "wsd")
  manager.close()

  quickstart.train_vae(data_dir, vae_dir, scale=0.01)  # both stages done: nothing trains, nothing is refused
  assert quickstart._latest_step(vae_dir) == 27
