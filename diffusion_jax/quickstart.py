"""The quickstart: text-to-video on the built-in data, the whole lineage in one command.

  python -m diffusion_jax quickstart [--workdir=quickstart_out] [--scale=1.0]

Stages (each a real run of the same code a user runs by hand; re-running
the command resumes or skips what is finished):
  1. data        moving_digits, one digit per clip, 24-40 px sides, 1/5/9 frames
  2. vae         causal video VAE (configs/vae_video.py:quickstart), then its second stage on
                 9-frame clips (configs/vae_video.py:quickstart,long_clips) -> WORKDIR/vae
  3. encode      VAE latents + all-MiniLM-L6-v2 caption embeddings -> WORKDIR/latents
  4. dit         text-to-video DiT, rectified flow (configs/video_dit.py:quickstart) -> WORKDIR/dit
  5. classifier  the project's digit classifier (configs/classifier_digits.py) -> WORKDIR/classifier
  6. export      WORKDIR/export (EMA params, config, bundled VAE)
  7. evaluate    videos for held-out captions; per clip the prompted digit (classifier), digit and
                 background colour, direction, speed, digit count and the temporal seam score, each
                 also on VAE reconstructions of the real clips and on the real clips (the
                 ceilings); FD/KID -> WORKDIR/eval
  8. report      WORKDIR/report.md: the checks table (generated | VAE reconstruction | real), the
                 other metrics, the sample GIFs, the wall time of each stage

--scale multiplies every stage's training steps (0.1 for a quick look).
"""
import json
import os
import shutil
import time

import numpy as np

from diffusion_jax import checkpoint, encode, evaluate, export, inference, media
from diffusion_jax import config as config_lib
from diffusion_jax.data import encoded, pipeline, sources
from diffusion_jax.data.moving_digits import QUICKSTART_DATA
from diffusion_jax.train import loop

SHEET_ROWS = 12  # prompts on the report's contact sheet
# What configs/vae_video.py:quickstart,long_clips changes of the first stage's run-defining fields.
VAE_SECOND_STAGE_CHANGES = ("train.lr", "train.lr_schedule", "train.warmup_steps")
# Held-out captions the report generates clips for: at 40 one clip moves a rate by 2.5 points and the
# same model scored 0.75-0.89 on the prompted digit under different seeds; 80 halve that spread for
# ~10 s more (BENCHMARKS.md).
NUM_SAMPLES = 80


def _config(name: str, arg: str, **overrides):
  config = config_lib.load_config(config_lib.recipe_path(name) + ":" + arg)
  with config.unlocked():
    for path, value in overrides.items():
      section, field = path.split(".")
      config[section][field] = value
  return config


def _steps(config, scale: float) -> None:
  config.train.steps = max(10, int(round(config.train.steps * scale)))
  for key in ("ckpt_every", "eval_every"):
    if config.train[key]:
      config.train[key] = min(config.train[key], config.train.steps)


def run(workdir: str, *, scale: float = 1.0, num_samples: int = NUM_SAMPLES) -> str:
  """Runs every stage into workdir; returns the report's path."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  times = {}
  start_all = time.time()

  def stage(name):
    print(f"\n=== quickstart: {name} ===", flush=True)
    times[name] = time.time()

  def done(name):
    times[name] = time.time() - times[name]

  stage("data")
  data_dir = os.path.join(workdir, "data")
  sources.ensure_dataset("moving_digits", data_dir, **QUICKSTART_DATA)
  classifier_config = _config("classifier_digits.py", "", **{"data.data_dir": data_dir})
  sources.ensure_dataset(classifier_config.data.name, data_dir, **pipeline.builder_kwargs(classifier_config.data))
  done("data")

  stage("vae")
  train_vae(data_dir, os.path.join(workdir, "vae"), scale)
  done("vae")

  stage("encode")
  latents = os.path.join(workdir, "latents")
  for split in ("train", "validation"):
    # Sides cropped to multiples of 8 px, clips padded to the longest duration, one clip at a time:
    # 3 x 3 sizes = 9 compilations of the small encoder (27 with a compilation per duration).
    encode.encode_dataset("moving_digits", split, data_dir, latents, vae_path=os.path.join(workdir, "vae"),
                          builder_kwargs=dict(QUICKSTART_DATA), crop_multiple=8, batch_size=1,
                          pad_frames=max(QUICKSTART_DATA["durations"]))
  channels = inference.load_vae(os.path.join(workdir, "vae")).latent_channels
  done("encode")

  stage("dit")
  dit_config = _config("video_dit.py", f"quickstart,data={latents},channels={channels}")
  _steps(dit_config, scale)
  encoded.record_conditioners(dit_config)
  loop.train(dit_config, os.path.join(workdir, "dit"))
  done("dit")

  stage("classifier")
  _steps(classifier_config, scale)
  _, classifier_metrics = loop.train(classifier_config, os.path.join(workdir, "classifier"))
  classifier_export = _fresh_export(export, os.path.join(workdir, "classifier"),
                                    os.path.join(workdir, "classifier_export"))
  done("classifier")

  stage("export")
  dit_export = _fresh_export(export, os.path.join(workdir, "dit"), os.path.join(workdir, "export"))
  done("export")

  stage("evaluate")
  scores = evaluate.evaluate(dit_export, os.path.join(workdir, "eval"), num_samples=num_samples,
                             classifier=classifier_export, data_dir=data_dir)
  done("evaluate")

  times["total"] = time.time() - start_all
  report = write_report(workdir, scores, times, classifier_metrics)
  print(f"\nquickstart done in {times['total']:.0f}s: report {report}", flush=True)
  return report


def train_vae(data_dir: str, vae_dir: str, scale: float = 1.0) -> None:
  """configs/vae_video.py:quickstart, then its second stage on 9-frame clips (:quickstart,long_clips)
  resumed in the same workdir; a finished stage is skipped."""
  first = _config("vae_video.py", "quickstart", **{"data.data_dir": data_dir})  # trains on QUICKSTART_DATA
  second = _config("vae_video.py", "quickstart,long_clips", **{"data.data_dir": data_dir})
  _steps(first, scale)
  _steps(second, scale)
  if _latest_step(vae_dir) < first.train.steps:
    loop.train(first, vae_dir)
  loop.train(second, vae_dir, allow_changes=VAE_SECOND_STAGE_CHANGES)


def _fresh_export(export, workdir: str, out_dir: str) -> str:
  """An export of the newest step, rewritten when the run has moved on since the last one."""
  if os.path.isdir(out_dir):
    try:
      if export.load_info(out_dir)["step"] == _latest_step(workdir):
        return out_dir
    except ValueError:
      pass
    shutil.rmtree(out_dir)
  return export.export(workdir, out_dir)


def _latest_step(workdir: str) -> int:
  """The newest checkpoint's step; 0 without one."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return 0
  manager = checkpoint.make_manager(workdir, keep=1, create=False)
  step = manager.latest_step()
  manager.close()
  return step or 0


CHECKS = (
    ("digit", "digit (classifier, majority over frames)"),
    ("digit_colour", "digit colour"),
    ("background", "background colour"),
    ("direction", "motion direction"),
    ("speed", "speed class"),
    ("count", "number of digits"),
    ("seam", "temporal seam score (1 = no seam)"),
)


def checks_table(scores: dict) -> list[str]:
  """Markdown lines: evaluate's per-clip checks (check/<name>/<set>), one row per check, the
  generated clips beside the VAE reconstructions of the real clips and the real clips."""
  if not any(k.startswith("check/") for k in scores):
    return []

  def cell(value):
    return "n/a" if value is None or (isinstance(value, float) and value != value) else f"{value:.3f}"

  lines = ["Per-clip checks against each prompt's caption: agreement rates (the seam score is a ratio).",
           "The real clips are the checks' own ceiling, the VAE reconstructions the latent model's.", "",
           "| check | generated | VAE reconstruction | real | clips |", "| --- | --- | --- | --- | --- |"]
  for name, title in CHECKS:
    values = [scores.get(f"check/{name}/{which}") for which in ("generated", "vae", "real")]
    clips = scores.get(f"check/{name}/clips", "")
    lines.append(f"| {title} | " + " | ".join(cell(v) for v in values) + f" | {clips} |")
  return lines + [""]


def write_report(workdir: str, scores: dict, times: dict, classifier_metrics: dict) -> str:
  """WORKDIR/report.md: what was trained, the metrics, the samples, the time of each stage."""
  lines = ["# diffusion_jax quickstart: text-to-video on moving digits", ""]
  lines += checks_table(scores)
  lines += ["| metric | value |", "| --- | --- |"]
  for key in sorted(k for k in scores if not k.startswith("check/")):
    value = scores[key]
    if isinstance(value, float):
      lines.append(f"| {key} | {value:.4g} |")
    elif isinstance(value, (int, str)) and key not in ("export",):
      lines.append(f"| {key} | {value} |")
  if classifier_metrics:
    accuracy = classifier_metrics.get("eval/accuracy")
    if accuracy is not None:
      lines.append(f"| classifier validation accuracy (real frames) | {accuracy:.3f} |")
  lines += ["", "## Wall time (s)", "", "| stage | seconds |", "| --- | --- |"]
  lines += [f"| {name} | {seconds:.0f} |" for name, seconds in times.items()]
  lines += ["", "## Samples (prompt -> video)", ""]
  manifest = os.path.join(workdir, "eval", "samples.jsonl")
  records = []
  if os.path.isfile(manifest):
    with open(manifest) as f:
      records = [json.loads(line) for line in f]
  # A contact sheet first: one row per prompt, its frames left to right (the GIFs follow).
  clips, prompts = [], []
  for record in records[:SHEET_ROWS]:
    npz = next((n for n in record.get("files", []) if n.endswith(".npz")), None)
    if npz:
      with np.load(os.path.join(workdir, "eval", npz)) as data:
        clips.append(data["frames"])
      prompts.append(record["prompt"])
  if clips:
    media.save_clip_rows(clips, os.path.join(workdir, "eval", "sheet.png"), scale=2)
    lines += ["![](eval/sheet.png)", "", "Rows, top to bottom:", ""]
    lines += [f"{i + 1}. {prompt}" for i, prompt in enumerate(prompts)] + [""]
  for record in records:
    for name in record.get("files", []):
      if name.endswith(".gif"):
        lines.append(f"- {record['prompt']}: ![](eval/{name})")
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
