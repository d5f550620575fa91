"""Metrics and sample grids from an export (export.py): what a trained model is worth.

  evaluate(export_dir, out_dir, num_samples=..., classifier=CLASSIFIER_EXPORT)

writes OUT_DIR/metrics.json, sample grids (PNG, one row per class) and, for
video samples, one GIF per sample. By the export's task:

  dit  generate num_samples images over the classes (sample.sample_classes with the
       config's sample section); the classifier's conditional accuracy (a
       sample of class 3 classified as a 3); Fréchet distance and KID between
       real frames of the dataset's eval split and the samples, in a pluggable
       feature space; the held-out diffusion loss per timestep bucket
       (dit_task.eval_fn + summarize_eval over train.eval_batches eval batches).
  vae  the vae task's held-out metrics (eval/psnr, eval/ssim from metrics.py,
       eval/l1, eval/kl, latent stats) over ceil(num_samples / global_batch)
       eval-split batches, reconstructions of the first batch as a grid
       (real | reconstruction, first frames) and side-by-side GIFs.

The naive baseline (baseline="frames", `evaluate --baseline=frames`; text-to-video models): the
same captions sampled frame by frame, each frame an independent one-frame video of the same model,
stacked into clips; the temporal consistency of eval_metrics (digit identity across frames,
centre-of-mass path roughness, frame-to-frame change) of the video model's clips, these and the
real clips side by side in metrics.json (temporal/<name>/<set>) and temporal_table, and
baseline_<i>.gif (video model | frame by frame | real).

Feature spaces (the `feature_extractor` callable contract): a function
frames -> features, taking uint8 numpy frames [N, H, W, 3] (image models; videos
[N, T, H, W, 3] for video models) of any N and any size, returning a float
array [N, D] with D fixed, deterministic for its input. It must do its own
resizing and normalisation (Inception-v3 wants 299 px in [-1, 1], I3D 224 px
clips). Default: the project classifier's penultimate features
(inference.classify on the `classifier` export). To use Inception, wrap
a local weights file in such a callable; nothing is downloaded here.

The metric maths (FD, KID, motion, clip attributes) is eval_metrics.py; this module runs it per task.

Everything is reproducible for a seed: the same seed gives the same samples,
the same real subset and the same KID subsets, hence the same metrics.
"""
import dataclasses
import functools
import json
import math
import os

import jax
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import eval_metrics
from diffusion_jax import export as export_lib
from diffusion_jax import inference, media, paths
from diffusion_jax import sample as sample_lib
from diffusion_jax import sharding
from diffusion_jax.data import encoded, imaging, pipeline, sources
from diffusion_jax.train import classifier_task, dit_task, loop, vae_task

# --------------------------------------------------------------------------- pictures

def write_samples(samples, labels, out_dir: str, num_classes: int) -> list[str]:
  """samples.png (rows by class) for images [N, H, W, C]; for videos [N, T, H, W, C] also a
  first-frame grid and sample_{i:04d}_class{c}.gif each. Returns the files written."""
  samples, labels = np.asarray(samples), np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  per_class = max(int(np.bincount(labels, minlength=num_classes).max()), 1)
  files = []
  if samples.ndim == 5:
    for i, (video, label) in enumerate(zip(samples, labels)):
      files.append(media.save_gif(video, os.path.join(out_dir, f"sample_{i:04d}_class{int(label)}.gif")))
    samples = samples[:, 0]
  files.append(media.save_grid(samples[order], os.path.join(out_dir, "samples.png"), columns=per_class))
  return files


# --------------------------------------------------------------------------- data

def real_frames(config, num: int, *, seed: int, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(frames uint8 [num, S, S, C], labels [num]) of the config's eval split, a seeded subset,
  resized to data.image_size where they differ (the size the model samples at)."""
  data = config.data
  source = sources.open_source(data.name, data.eval_split, data_dir or data.data_dir,
                               **pipeline.builder_kwargs(data))
  if len(source) == 0:
    raise ValueError(f"eval split {data.eval_split!r} of {data.name!r} is empty")
  rng = np.random.default_rng([seed, 1])
  indices = rng.choice(len(source), num, replace=num > len(source))
  size = int(data.image_size)
  frames, labels = [], []
  for index in indices:
    example = source[int(index)]
    labels.append(int(example["label"]))
    video = np.asarray(example["video"])
    frame = video[0] if video.ndim == 4 else video
    if frame.shape[:2] != (size, size):
      frame = np.clip(np.round(imaging.resize_frames(frame[None].astype(np.float32), size, size)[0]), 0, 255)
    frames.append(frame.astype(np.uint8))
  return np.stack(frames), np.asarray(labels, np.int64)


def _config_with_data_dir(config, data_dir: str):
  config = config_lib.from_json(config_lib.to_json(config))
  if data_dir:
    config.data.data_dir = data_dir
  return config


def _one_device_mesh(config):
  """The config's mesh axes on the first local device: the model's logical constraints resolve,
  and nothing is split."""
  mesh_config = config_lib.from_json(config_lib.to_json(config)).mesh
  mesh_config.shape = [-1] + [1] * (len(mesh_config.axes) - 1)
  return sharding.make_mesh(mesh_config, devices=jax.local_devices()[:1]), sharding.logical_rules(mesh_config)


def held_out_loss(export, *, data_dir: str = "", batches: int = 0) -> dict:
  """The task's held-out metrics (eval_fn + summarize_eval) over `batches` (default
  train.eval_batches) batches of the eval split: the loop's fixed eval set (same seed, same noise),
  so the numbers compare with the run's eval/*."""
  config = _config_with_data_dir(export.config, data_dir)
  task = loop.TASKS[config.task]
  model, objective = task.build_model(config), task.make_objective(config)
  mesh, rules = _one_device_mesh(config)
  source = iter(task.make_dataset(config, split=config.data.eval_split, process_index=0, process_count=1,
                                  seed=config.data.shuffle_seed))
  eval_batch = jax.jit(lambda params, batch, index: task.eval_fn(params, model, objective, batch, index, config))
  auxes = []
  with sharding.activate(mesh, rules):
    for index in range(batches or int(config.train.eval_batches)):
      batch = {k: v for k, v in next(source).items() if k not in ("captions", "skipped")}
      auxes.append(jax.device_get(eval_batch(export.params, batch, np.int32(index))))
  return task.summarize_eval(auxes)


# --------------------------------------------------------------------------- evaluate

def _classifier_features(classifier_export):
  def features(frames):
    return inference.classify(classifier_export, frames)[1]

  features.__name__ = f"classifier_penultimate:{classifier_export.path}"
  return features


def _evaluate_dit(export, out_dir, *, num_samples, seed, classifier, feature_extractor, data_dir) -> dict:
  config = export.config
  num_classes = int(config.model.num_classes)
  labels = np.arange(num_samples) % num_classes
  sampler, steps = str(config.sample.sampler), int(config.sample.steps)
  cfg_scale = float(config.sample.cfg_scale)
  gen = inference.with_conditioners(config, dit_task.build_model(config), export.params, int(export.info["step"]))
  mesh, rules = _one_device_mesh(config)
  with sharding.activate(mesh, rules):
    samples = sample_lib.sample_classes(gen, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed)
  metrics = dict(sampler=sampler, sample_steps=steps, cfg_scale=cfg_scale)
  files = write_samples(samples, labels, out_dir, num_classes)

  classifier_export = export_lib.load_export(classifier) if classifier else None
  real, real_labels = real_frames(config, num_samples, seed=seed, data_dir=data_dir)
  if classifier_export is not None:
    predicted = np.argmax(inference.classify(classifier_export, samples)[0], axis=-1)
    metrics["classifier_accuracy"] = float(np.mean(predicted == labels))
    # The same classifier on real frames of this size: the ceiling the samples are held to.
    real_predicted = np.argmax(inference.classify(classifier_export, real)[0], axis=-1)
    metrics["classifier_accuracy_real"] = float(np.mean(real_predicted == real_labels))
    metrics["classifier"] = classifier_export.path
  if feature_extractor is None and classifier_export is not None:
    feature_extractor = _classifier_features(classifier_export)
  if feature_extractor is not None:
    real_features = np.asarray(feature_extractor(real), np.float64)
    fake_features = np.asarray(feature_extractor(samples), np.float64)
    if real_features.shape[0] != len(real) or fake_features.shape[0] != len(samples) or real_features.ndim != 2:
      raise ValueError(f"feature_extractor must map [N, ...] frames to [N, D]; got {real_features.shape} for "
                       f"{len(real)} real and {fake_features.shape} for {len(samples)} generated frames")
    metrics["feature_space"] = getattr(feature_extractor, "__name__", type(feature_extractor).__name__)
    metrics["feature_dim"] = int(real_features.shape[1])
    metrics["fd"] = eval_metrics.frechet_distance(real_features, fake_features)
    metrics["kid"], metrics["kid_std"] = eval_metrics.kernel_inception_distance(real_features, fake_features,
                                                                                seed=seed)
  else:
    metrics["feature_space"] = "none (no classifier export and no feature_extractor: FD and KID skipped)"
  files.append(media.save_grid(real[np.argsort(real_labels, kind="stable")], os.path.join(out_dir, "real.png"),
                         columns=max(-(-num_samples // num_classes), 1)))
  metrics.update(held_out_loss(export, data_dir=data_dir))
  return metrics, files


def _evaluate_vae(export, out_dir, *, num_samples, seed, data_dir) -> dict:
  """Held-out reconstruction metrics of a VAE export over the loop's fixed eval batches (the
  eval set is fixed by data.shuffle_seed; `seed` does not change it)."""
  del seed

  config = _config_with_data_dir(export.config, data_dir)
  batches = -(-num_samples // int(config.train.global_batch))
  metrics = held_out_loss(export, data_dir=data_dir, batches=batches)
  metrics["eval_clips"] = batches * int(config.train.global_batch)

  batch = next(iter(vae_task.make_dataset(config, split=config.data.eval_split, seed=config.data.shuffle_seed)))
  video = np.asarray(batch["video"])[:num_samples]
  model = vae_task.build_model(config)
  mesh, rules = _one_device_mesh(config)
  with sharding.activate(mesh, rules):
    recon, _, _ = jax.jit(lambda p, v: model.apply({"params": p}, v, sample_posterior=False))(
        export.params["vae"], video.astype(np.float32) / 127.5 - 1.0)
  recon = np.asarray(np.clip((np.asarray(recon) + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
  pairs = np.stack([video[:, 0], recon[:, 0]], axis=1).reshape((-1,) + video.shape[2:])
  files = [media.save_grid(pairs, os.path.join(out_dir, "reconstructions.png"), columns=2)]
  if video.shape[1] > 1:
    for i in range(len(video)):
      files.append(media.save_gif(np.concatenate([video[i], recon[i]], axis=2),
                            os.path.join(out_dir, f"reconstruction_{i:04d}.gif")))
  return metrics, files


def _evaluate_video_dit(export, out_dir, *, num_samples, seed, classifier, feature_extractor, data_dir,
                        baseline="") -> dict:
  """Text-to-video (or -image) on held-out captions: num_samples videos for the
  captions of the eval split's video clips (at each clip's own size,
  sample.frames frames; a pixel model: scaled to fit one row as training
  scales such a clip; a fixed-size image model: its images at its size),
  then the per-clip attribute checks of eval_metrics.measure_clip against each caption
  (clip_truth: digit by the classifier's majority over frames, digit and
  background colour, motion direction, speed class, number of digits) and the
  temporal seam score, as check/<name>/generated, and the same checks on the
  real clips of those captions (check/<name>/real, the checks' own ceiling) and
  on VAE reconstructions of them (check/<name>/vae, the latent model's ceiling;
  latent models only); check/<name>/clips is how many clips each check covers.
  The temporal consistency of eval_metrics.temporal_rates (temporal/<name>/<set>, clips counted in
  temporal/<name>/<set>_clips) on the generated and the real clips; with baseline="frames" also
  the frame-by-frame baseline (frame_by_frame) as the set "framewise", under both the checks and
  the temporal metrics, and baseline_<i>.gif (video model | frame by frame | real) for the first
  BASELINE_GIFS captions. Then FD/KID between the generated and real frames in the feature space."""
  config = _config_with_data_dir(export.config, data_dir)
  gen = inference.with_conditioners(config, dit_task.build_model(config), export.params, int(export.info["step"]))
  source = sources.open_source(config.data.name, config.data.eval_split, config.data.data_dir,
                               **pipeline.builder_kwargs(config.data))
  rng = np.random.default_rng([seed, 2])
  order = rng.permutation(len(source))
  makes_video = not config.data.fixed_size
  chosen = []
  for index in order:
    example = source[int(index)]
    if _clip_shape(example)[0] > 1 or not makes_video:
      chosen.append(example)
    if len(chosen) == num_samples:
      break
  if len(chosen) < 2:
    kind = "video clips" if makes_video else "examples"
    raise ValueError(f"the eval split of {config.data.name} has fewer than 2 {kind} to take captions from")
  frames = int(config.sample.frames)
  requests = []
  for example in chosen:
    caption = example["caption"].decode() if isinstance(example["caption"], bytes) else str(example["caption"])
    shape = _clip_shape(example)  # a pixel dataset's examples hold the clip itself, no source_shape
    requests.append(_fit_to_row(gen, sample_lib.Request(caption, (shape[1], shape[2]), min(frames, shape[0]))))
  sampler = str(config.sample.sampler)
  steps, cfg_scale = int(config.sample.steps), float(config.sample.cfg_scale)
  videos, notes = sample_lib.sample_requests(gen, requests, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                             rows_per_call=int(config.sample.rows_per_call), seed=seed)
  sample_lib.write_outputs(videos, requests, notes, out_dir, gen=gen, sampler=sampler, steps=steps,
                           cfg_scale=cfg_scale, seed=seed)
  files = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith("sample_")]
  metrics = dict(sampler=sampler, sample_steps=steps, cfg_scale=cfg_scale, videos=len(videos))
  framewise = None
  if baseline == "frames":
    framewise = frame_by_frame(gen, requests, videos, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                               rows_per_call=int(config.sample.rows_per_call), seed=seed)
    metrics["baseline"] = "frames"

  originals = _source_examples(config, chosen)
  truths = [eval_metrics.clip_truth(original) for original in originals]
  real_clips = [_as_clip(original["video"])[:len(video)] for original, video in zip(originals, videos)]
  # Cropped like the generated clips (multiples of a token's pixels), so the ceiling is measured on
  # the pixels the model could have made.
  crop_multiple = math.lcm(*sample_lib.pixel_factors(gen))
  reconstructions = reconstruct(gen.vae, real_clips, crop_multiple=crop_multiple) if gen.vae is not None else None
  size = 32  # frames are compared at one size (the classifier resizes anyway)

  def frames_at(clips):
    return np.concatenate([np.clip(np.round(imaging.resize_frames(c.astype(np.float32), size, size)), 0, 255)
                           .astype(np.uint8) for c in clips])

  generated, real = frames_at(videos), frames_at(real_clips)
  classifier_export = export_lib.load_export(classifier) if classifier else None
  classify = None
  if classifier_export is not None:
    classify = functools.partial(classify_frames, classifier_export)
    metrics["classifier"] = classifier_export.path
    if feature_extractor is None:
      feature_extractor = _classifier_features(classifier_export)
  # The same checks on generated clips, on VAE reconstructions of the real clips (what the
  # latent model can at best give back) and on the real clips (what the checks can at best score).
  sets = dict(generated=videos, framewise=framewise, vae=reconstructions, real=real_clips)
  for which, clips in sets.items():
    if clips is None:
      continue
    rates, counts = eval_metrics.attribute_rates(clips, truths, classify=classify)
    for name, rate in rates.items():
      metrics[f"check/{name}/{which}"] = rate
    if which == "real":
      metrics.update({f"check/{name}/clips": count for name, count in counts.items()})
    if which != "vae":  # reconstructions follow the real clips frame by frame: nothing to learn here
      rates, counts = eval_metrics.temporal_rates(clips, truths, classify=classify)
      for name in rates:
        metrics[f"temporal/{name}/{which}"] = rates[name]
        metrics[f"temporal/{name}/{which}_clips"] = counts[name]
  if framewise is not None:
    for i in range(min(BASELINE_GIFS, len(videos))):
      real_clip = real_clips[i]  # at the size the model made (a pixel model's may be scaled to fit a row)
      if real_clip.shape[1:3] != videos[i].shape[1:3]:
        real_clip = np.clip(np.round(imaging.resize_frames(real_clip.astype(np.float32), *videos[i].shape[1:3])),
                            0, 255).astype(np.uint8)
      files.append(media.save_gif(media.side_by_side([videos[i], framewise[i], real_clip]),
                                  os.path.join(out_dir, f"baseline_{i}.gif")))
  if feature_extractor is not None:
    real_features = np.asarray(feature_extractor(real), np.float64)
    fake_features = np.asarray(feature_extractor(generated), np.float64)
    metrics["feature_space"] = getattr(feature_extractor, "__name__", type(feature_extractor).__name__)
    metrics["fd"] = eval_metrics.frechet_distance(real_features, fake_features)
    metrics["kid"], metrics["kid_std"] = eval_metrics.kernel_inception_distance(real_features, fake_features,
                                                                                seed=seed)
  metrics.update(held_out_loss(export, data_dir=data_dir))
  return metrics, files


def frame_by_frame(gen, requests, videos, *, sampler: str, steps: int, cfg_scale: float, rows_per_call: int,
                   seed: int) -> list[np.ndarray]:
  """The naive baseline, an image model run once per frame: for each request as many one-frame
  videos (images) of its prompt, at the size its video was made, as that video has frames, all
  through sample.sample_requests in one packed job (the same model, sampler and steps; each frame
  its own place in the rows, so its own noise), stacked into a clip uint8 [T, H, W, C]. The noise
  comes from seed + 1: packed alike, frames would otherwise sit where the video's tokens sat
  with the seed's keys and take the very noise of its frames, a pairing that is not the baseline."""
  singles, owners = [], []
  for index, (request, video) in enumerate(zip(requests, videos)):
    single = dataclasses.replace(request, mode="t2v", frames=1, size=tuple(int(s) for s in video.shape[1:3]))
    singles += [single] * len(video)
    owners += [index] * len(video)
  images, _ = sample_lib.sample_requests(gen, singles, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                         rows_per_call=rows_per_call, seed=seed + 1)
  clips = [[] for _ in requests]
  for owner, image in zip(owners, images):
    clips[owner].append(image[0])  # a pixel model of temporal patch p makes p frames: the first is its image
  return [np.stack(clip) for clip in clips]


TEMPORAL_TITLES = (
    ("identity", "digit identity (frames showing the majority digit)"),
    ("path_roughness", "centre-of-mass path roughness (mean size of its 2nd difference over the side; 0 = smooth)"),
    ("frame_change", "mean frame-to-frame change (fraction of 255)"),
)


def temporal_table(metrics: dict) -> list[str]:
  """Markdown lines: the temporal metrics (temporal/<name>/<set>) of the video model, the
  frame-by-frame baseline and the real clips side by side; [] when there are none."""
  if not any(k.startswith("temporal/") for k in metrics):
    return []

  def cell(name, which):
    value = metrics.get(f"temporal/{name}/{which}")
    if value is None or value != value:
      return "n/a"
    return f"{value:.3f} ({metrics.get(f'temporal/{name}/{which}_clips', 0)})"

  lines = ["Temporal consistency, mean over clips (clips measured):", "",
           "| metric | video model | frame by frame | real |", "| --- | --- | --- | --- |"]
  for name, title in TEMPORAL_TITLES:
    lines.append(f"| {title} | " + " | ".join(cell(name, w) for w in ("generated", "framewise", "real")) + " |")
  return lines


def classify_frames(classifier_export, frames, *, chunk: int = 64) -> np.ndarray:
  """Predicted digits [T] of uint8 frames [T, H, W, 3] of any size, brought to the classifier's
  data.image_size as it was trained (classifier_task.SingleDigitFrame: a locating classifier's
  frames are first padded to a square with their background) and classified in chunks of
  `chunk` frames, so one compilation serves every clip size and length."""
  config = classifier_export.config
  squarer = classifier_task.SingleDigitFrame(size=int(config.data.image_size),
                                             pad_square=bool(config.model.locate))
  frames = [squarer.random_map({"video": frame, "label": 0}, None)["frames"] for frame in np.asarray(frames)]
  count = len(frames)
  frames = np.stack(frames + [np.zeros_like(frames[0])] * (-count % chunk))
  logits, _ = inference.classify(classifier_export, frames, batch_size=chunk)
  return np.argmax(logits[:count], axis=-1)


def _fit_to_row(gen, request):
  """A pixel model's request scaled down (aspect kept, then frames cut) to fit one row of
  data.tokens_per_row tokens, as the training pipeline fits a clip of that size
  (pipeline.plan_shape); a request that fits, or a latent model's, unchanged."""
  data = gen.config.data
  if gen.vae is not None or data.fixed_size:
    return request
  patch = tuple(int(p) for p in data.patch)
  plan = pipeline.plan_shape(request.frames, *request.size, patch=patch, tokens_per_row=int(data.tokens_per_row),
                             max_area=int(data.max_area), max_frames=int(data.max_frames),
                             min_side=int(data.get("min_side", 4 * max(patch[1:]))))  # optional: 4 patches
  if plan is None:
    return request  # sample_requests names the request that cannot fit
  return dataclasses.replace(request, frames=plan[0], size=(plan[1], plan[2]))


def _clip_shape(example) -> tuple[int, int, int]:
  """(frames, height, width) of an eval example's source clip: an encoded example's source_shape,
  else the shape of its clip."""
  if "source_shape" in example:
    return tuple(int(x) for x in np.asarray(example["source_shape"]))
  return tuple(int(x) for x in _as_clip(example["video"]).shape[:3])


def _as_clip(video) -> np.ndarray:
  video = np.asarray(video)
  return video if video.ndim == 4 else video[None]


def _source_examples(config, examples) -> list[dict]:
  """The source examples behind eval examples (their clip under "video", uint8 [T, H, W, C], and
  the generator's metadata): the examples themselves, or for an encoded latent dataset the
  examples of its source dataset, found by id."""
  if all("video" in ex for ex in examples):
    return list(examples)

  meta = encoded.encoded_metadata(str(config.data.name))
  origin = meta["source"]
  split = meta["splits"][config.data.eval_split]["source_split"]
  opened = sources.open_source(origin["name"], split, origin["data_dir"], **(origin.get("builder_kwargs") or {}))
  by_id = {int(opened[i]["id"]): i for i in range(len(opened))}
  return [opened[by_id[int(ex["id"])]] for ex in examples]


def reconstruct(vae, clips, *, crop_multiple: int = 0) -> list[np.ndarray]:
  """VAE reconstructions (posterior mean, decoded) of uint8 clips [T, H, W, C], each first trimmed
  to 1 + 4k frames and centre-cropped to multiples of the VAE's spatial factor and of crop_multiple
  (as the encode step does), one clip at a time; uint8 like the input. Every clip is zero-padded
  at the end to the longest one's frames and the padding dropped after decoding: the VAE is
  causal in time, so later frames change nothing earlier, and the encoder and decoder compile
  once per clip size instead of once per size and length (most of evaluate's time before)."""
  factor = math.lcm(int(vae.spatial_factor), crop_multiple or 1)
  clips = [encoded.trim_and_crop(_as_clip(clip), factor) for clip in clips]
  longest = max((len(clip) for clip in clips), default=0)
  out = []
  for clip in clips:
    padded = np.concatenate([clip, np.zeros((longest - len(clip),) + clip.shape[1:], clip.dtype)])
    mean, _ = vae.encode(padded[None].astype(np.float32) / 127.5 - 1.0)
    decoded = vae.decode(mean)[0, :len(clip)]
    out.append(np.clip(np.round((decoded + 1.0) * 127.5), 0, 255).astype(np.uint8))
  return out


BASELINES = ("", "frames")
BASELINE_GIFS = 4  # side-by-side GIFs of the baseline: the first captions'


def evaluate(export_dir: str, out_dir: str, *, num_samples: int, seed: int = 0, classifier: str = "",
             feature_extractor=None, data_dir: str = "", baseline: str = "", eval_data: str = "") -> dict:
  """Evaluates an export; writes OUT_DIR/metrics.json and pictures; returns the metrics.

  classifier: a classifier export (configs/classifier_digits.py, exported) for
  conditional accuracy and the default feature space; feature_extractor: a
  callable frames -> [N, D] (see the module docstring) replacing it for FD/KID.
  data_dir overrides the export's data.data_dir (where the eval split lives); eval_data its
  data.name: another dataset of the same kind (for a latent model, encoded with the same VAE) whose
  eval split's captions and clips are used, e.g. the same clips captioned otherwise, so models
  trained on different captions answer the same prompts. baseline="frames"
  (text-to-video models) also samples every clip frame by frame with the same model, the naive
  baseline a spacetime model is measured against (frame_by_frame).
  """
  if num_samples < 2:
    raise ValueError(f"num_samples={num_samples}: FD and KID need at least 2 samples")
  if baseline not in BASELINES:
    raise ValueError(f"unknown baseline {baseline!r}; known: 'frames' (or none)")
  export = export_lib.load_export(export_dir)
  task = export.config.task
  if task not in ("dit", "vae"):
    raise ValueError(f"evaluate knows tasks 'dit' and 'vae'; {export_dir} is task {task!r}")
  if eval_data:
    if not (task == "dit" and dit_task.samples_from_prompts(export.config)):
      raise ValueError(f"eval_data gives a prompt model other prompts; {export_dir} (task {task!r}) takes none")
    export.config.data.name = eval_data  # this loaded copy only; the export on disk is untouched
  makes_video = task == "dit" and dit_task.samples_from_prompts(export.config) and not export.config.data.fixed_size
  if baseline and not makes_video:
    raise ValueError(f"baseline={baseline!r} compares a video model's clips with its frames made one by one; "
                     f"{export_dir} (task {task!r}) does not make videos from prompts")
  common = dict(num_samples=num_samples, seed=seed, data_dir=data_dir)

  with paths.local_dir(out_dir) as local_out:  # a bucket gets the files when they are all written
    if task == "dit" and dit_task.samples_from_prompts(export.config):
      metrics, files = _evaluate_video_dit(export, local_out, classifier=classifier,
                                           feature_extractor=feature_extractor, baseline=baseline, **common)
    elif task == "dit":
      metrics, files = _evaluate_dit(export, local_out, classifier=classifier, feature_extractor=feature_extractor,
                                     **common)
    else:
      metrics, files = _evaluate_vae(export, local_out, **common)
    metrics = dict(metrics, export=export.path, task=task, step=export.info["step"], num_samples=num_samples,
                   seed=seed, files=sorted(os.path.basename(f) for f in files))
    with open(os.path.join(local_out, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=1, sort_keys=True)
      f.write("\n")
  return metrics
