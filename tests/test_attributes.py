"""Per-clip attribute checks of evaluate.py on clips the moving_digits generator itself renders
(known colours, background, direction, speed, count), the caption parser against the generator's
metadata, the temporal seam score, and the classifier's digit window."""
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import eval_metrics
from diffusion_jax.data import digits_canvas, imaging, moving_digits
from diffusion_jax.train import classifier_task


@pytest.fixture(scope="module")
def clips():
  """120 generator clips (1-3 digits, 1/5/9 frames, 24-64 px sides) as (examples, truths)."""
  images, labels = imaging.digit_images()
  examples = [moving_digits.render_moving_digits(images, labels, np.random.default_rng([7, 1, i]), min_side=24,
                                                 max_side=64, max_digits=3, durations=(1, 5, 9)) for i in range(120)]
  return examples, [eval_metrics.clip_truth(ex) for ex in examples]


def test_caption_attributes_invert_the_generator(clips):
  examples, truths = clips
  for example, truth in zip(examples, truths):
    parsed = moving_digits.caption_attributes(example["caption"])
    assert parsed["digits"] == list(example["labels"]) == truth["digits"], example["caption"]
    for direction, velocity in zip(parsed["directions"], example["velocities"]):
      if direction is not None:  # stated in the caption: the same as the generator's velocity
        assert direction == eval_metrics.velocity_direction(*velocity), example["caption"]
  assert moving_digits.caption_attributes("a photo of a cat") is None
  parsed = moving_digits.caption_attributes("an orange 7 moving quickly down and to the left and bouncing while a "
                                            "white 1 stands still on a dark gray background")
  assert parsed == dict(digits=[7, 1], colours=["orange", "white"], background="dark gray",
                        directions=["down-left", "still"], speeds=["quickly", None], bounced=[True, False])


def test_checks_agree_with_the_generator_on_its_own_clips(clips):
  examples, truths = clips
  videos = [ex["video"] for ex in examples]
  oracle = lambda video: np.full(len(video), 0)  # noqa: E731  a "classifier" that always says 0
  rates, counts = eval_metrics.attribute_rates(videos, truths, classify=oracle)
  for name in ("digit_colour", "background", "direction", "speed", "count"):
    assert rates[name] >= 0.95, (name, rates)
    assert counts[name] >= 10, (name, counts)
  assert counts["count"] == counts["background"] == len(videos)
  assert 0.0 < rates["digit"] < 0.3  # the always-0 classifier: right only on the zeros
  assert 0.85 < rates["seam"] < 1.15, rates  # real motion: no seam at latent-frame boundaries


def test_checks_fail_on_the_wrong_captions(clips):
  examples, truths = clips
  videos = [ex["video"] for ex in examples]
  shifted = truths[1:] + truths[:1]  # every clip judged against another clip's caption
  rates, _ = eval_metrics.attribute_rates(videos, shifted)
  for name in ("digit_colour", "background", "direction", "speed", "count"):
    assert rates[name] < 0.7, (name, rates)


def test_speed_class_and_count_of_known_clips():
  assert eval_metrics.speed_classes(40) == pytest.approx(dict(slowly=0.8, steadily=1.8, quickly=3.6))
  assert eval_metrics.speed_classes(24)["slowly"] == 0.5  # the generator's floor
  assert eval_metrics.speed_class(1.7, 40) == "steadily" and eval_metrics.speed_class(5.0, 40) == "quickly"
  video = np.zeros((5, 40, 40, 3), np.uint8)  # a red and a blue square on black, overlapping
  video[:, 5:20, 5:20] = digits_canvas.DIGIT_COLOURS["red"]
  video[:, 12:27, 12:27] = digits_canvas.DIGIT_COLOURS["blue"]
  assert eval_metrics.digit_count(video) == 2
  assert eval_metrics.digit_count(np.zeros_like(video)) == 0
  assert eval_metrics.clip_colours(video[:, :, :20])[1] == "black"


def test_seam_score_sees_a_jump_at_latent_boundaries(clips):
  examples, _ = clips
  moving = [ex["video"] for ex in examples if len(ex["video"]) == 9 and eval_metrics.clip_speed(ex["video"]) > 0.3]
  assert len(moving) >= 10
  assert 0.8 < eval_metrics.seam_score(moving) < 1.25
  jumped = []
  for video in moving:  # the second latent frame (frames 5-8) 12 levels brighter: a jump at 4 -> 5
    jumped.append(np.concatenate([video[:5], np.clip(video[5:].astype(int) + 12, 0, 255).astype(np.uint8)]))
  assert eval_metrics.seam_score(jumped) > 1.5
  across, within = eval_metrics.temporal_seam(np.zeros((9, 8, 8, 3)))
  assert across == within == 0.0
  assert np.isnan(eval_metrics.seam_score([np.zeros((1, 8, 8, 3))]))


def test_the_classifier_window_reads_a_digit_alike_at_any_canvas_size_and_place():
  images, _ = imaging.digit_images()
  windows = []
  for height, width, top, left in ((24, 24, 4, 4), (48, 96, 20, 60), (96, 40, 5, 8)):
    canvas = np.zeros((height, width, 3), np.float32)
    alpha = np.clip(imaging.bilinear_resize(images[0], 16, 16), 0, 1)[..., None]
    canvas[top:top + 16, left:left + 16] = alpha * np.asarray(digits_canvas.DIGIT_COLOURS["green"]) / 127.5
    windows.append(np.asarray(classifier_task.locate_digit(jnp.asarray(canvas[None] - 1.0), 24))[0])
  for window in windows[1:]:
    np.testing.assert_allclose(window, windows[0], atol=1e-4)
  assert np.abs(windows[0]).max() > 1.0  # the digit is there, not a blank
