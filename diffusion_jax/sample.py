"""All sampling: prompts (text-to-video and -image, image-to-video, extension, interpolation,
SDEdit) and class grids, each as packed rows through one generator (dit_task.generate).

  python -m diffusion_jax sample --workdir=/tmp/vdit --prompt="a red 3 moving quickly to the right"
  python -m diffusion_jax sample --workdir=/tmp/vdit --prompts=prompts.jsonl

A request is one video to make: a prompt, a size (height, width in pixels), a
number of frames, a mode and, for the conditioned modes, an input file:

  t2v          text only
  i2v          --input an image (or a video: its first frame) becomes frame 0
  extend       --input a video; its frames are kept and the clip continues
  interpolate  --input a video: its first and last frames are kept, the middle is made
  sdedit       --input a video: noised to --strength (0..1) and denoised under the prompt

A prompts file is JSON lines with the same fields ({"prompt", "size", "frames",
"mode", "input", "strength"}); missing fields take the flags' values. The
noise of call i of a run comes from the key (seed, i): the same requests and
seed give the same videos.

Sizes round to what the model takes: height and width down to a multiple of
(VAE factor x patch) (at least one), frames down to 1 + 4k for a causal video
VAE (pixel models: a multiple of the temporal patch); the manifest reports the
size asked and the size made. Requests of different sizes are packed into
rows of the config's token budget L (data.tokens_per_row) and sampled
sample.rows_per_call rows at a time by one compiled program, so a request list
larger than one call is split over several calls rather than running out of
memory. One request larger than L is an error that names it. Fixed-size image
models (data.image_size, e.g. the LDM U-Net of configs/ldm_digits.py) make
one frame at their one size whatever the request asks.

Latent models decode through the VAE recorded in the config (latent.vae),
after undoing the per-channel normalisation the model trained with
(latent.mean / latent.std). Conditioning frames of latent models: by
causality a prefix of frames encodes to exactly a prefix of latents, so i2v
and extension are exact; for interpolation the last latent frame is the
encoding of the clip's last frame held for the final four frames, an
approximation the manifest states.

A class-conditional pixel image model (no text, no VAE: dit_task.samples_from_prompts
is False) samples class grids instead (run_class_grid): sample.per_class images of
every class, one example per label packed into the config's rows, the whole grid
one compiled call; --out gets grid.png (a row per class), class_<c>.png and
samples.jsonl.

Outputs of prompts in --out (media.save_sample): sample_<i>.gif and .mp4 (.png for a
one-frame sample), sample_<i>.npz (uint8
frames [T, H, W, C]) and samples.jsonl.
"""
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import inference, media, sharding
from diffusion_jax.data import packing
from diffusion_jax.train import dit_task

MODES = ("t2v", "i2v", "extend", "interpolate", "sdedit")


@dataclasses.dataclass
class Request:
  prompt: str
  size: tuple[int, int]
  frames: int
  mode: str = "t2v"
  input: str = ""
  strength: float = 0.7


def parse_requests(prompts: list[str], prompts_file: str, defaults: dict) -> list[Request]:
  """Requests from --prompt flags and a JSON-lines file; each field defaults to `defaults`."""
  records = [dict(prompt=p) for p in prompts]
  if prompts_file:
    with open(prompts_file) as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{prompts_file}:{number} is not a JSON object: {e}") from e
  if not records:
    raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE.jsonl")
  requests = []
  for record in records:
    unknown = set(record) - {f.name for f in dataclasses.fields(Request)}
    if unknown:
      raise ValueError(f"unknown request fields {sorted(unknown)} in {record}")
    fields = {**defaults, **record}
    request = Request(prompt=str(fields["prompt"]), size=tuple(int(x) for x in fields["size"]),
                      frames=int(fields["frames"]), mode=str(fields.get("mode", "t2v")),
                      input=str(fields.get("input", "")), strength=float(fields.get("strength", 0.7)))
    if request.mode not in MODES:
      raise ValueError(f"unknown mode {request.mode!r} for prompt {request.prompt!r}; use one of {MODES}")
    if request.mode != "t2v" and not request.input:
      raise ValueError(f"mode {request.mode!r} needs an input image or video (prompt {request.prompt!r})")
    if not 0.0 < request.strength <= 1.0:
      raise ValueError(f"strength must be in (0, 1], got {request.strength}")
    requests.append(request)
  return requests


def read_media(path: str, channels: int) -> np.ndarray:
  """uint8 [T, H, W, C] from an image or a video file; a clear error naming the file otherwise."""
  import imageio.v3 as iio

  if not os.path.isfile(path):
    raise FileNotFoundError(f"input {path} does not exist")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      frames = data["frames"]
  else:
    try:
      frames = np.asarray(iio.imread(path, index=None))
    except Exception as e:  # imageio raises many types for unreadable files
      raise ValueError(f"cannot read input {path}: {e}") from e
  if frames.ndim == 3:
    frames = frames[None] if frames.shape[-1] in (1, 3, 4) else frames[..., None]
  if frames.ndim == 2:
    frames = frames[None, ..., None]
  if frames.ndim != 4 or frames.shape[0] == 0:
    raise ValueError(f"input {path} has shape {frames.shape}; expected an image or a video")
  if frames.shape[-1] == 4 and channels == 3:
    frames = frames[..., :3]  # drop alpha
  if frames.shape[-1] != channels:
    raise ValueError(f"input {path} has {frames.shape[-1]} channels, the model makes {channels}")
  return frames.astype(np.uint8)


# --------------------------------------------------------------------------- requests -> rows

def planned_shape(gen: inference.Generator, request: Request) -> tuple[int, int, int]:
  """(frames, height, width) in pixels that the model makes for a request (the rounding rule above)."""
  if "image_size" in gen.config.data:  # a fixed-size image model (the U-Net): one size only
    side = int(gen.config.data.image_size) * gen.spatial_factor
    return 1, side, side
  pt, ph, pw = gen.config.data.patch
  fh, fw = gen.spatial_factor * ph, gen.spatial_factor * pw
  height = max(fh, request.size[0] // fh * fh)
  width = max(fw, request.size[1] // fw * fw)
  if gen.vae is not None:
    frames = 1 + (max(request.frames, 1) - 1) // gen.temporal_factor * gen.temporal_factor
    frames = 1 + (frames - 1) // (gen.temporal_factor * pt) * (gen.temporal_factor * pt)
  else:
    frames = max(pt, request.frames // pt * pt)
  return frames, height, width


def _to_model_space(gen: inference.Generator, pixels: np.ndarray) -> np.ndarray:
  """uint8 [T, H, W, C] -> what the model denoises: [-1, 1] pixels or normalised latents [T', H', W', z]."""
  x = pixels.astype(np.float32) / 127.5 - 1.0
  if gen.vae is None:
    return x
  mean, _ = gen.vae.encode(x[None])
  latent = gen.config.latent
  return (np.asarray(mean)[0] - np.asarray(latent.mean, np.float32)) / np.asarray(latent.std, np.float32)


def _from_model_space(gen: inference.Generator, x: np.ndarray) -> np.ndarray:
  """The inverse of _to_model_space: uint8 frames [T, H, W, C]."""
  if gen.vae is not None:
    latent = gen.config.latent
    z = x * np.asarray(latent.std, np.float32) + np.asarray(latent.mean, np.float32)
    x = np.asarray(gen.vae.decode(jnp.asarray(z)[None]))[0]
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _fit_input(frames: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  """The input resized to (height, width) (bilinear) with its frame count unchanged."""
  from diffusion_jax.data import sources

  t, h, w = shape
  resized = sources.resize_frames(frames.astype(np.float32), h, w)
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def request_example(gen: inference.Generator, request: Request, index: int) -> tuple[dict, dict]:
  """(packer example, notes) of one request: noise-space placeholders plus the given tokens."""
  config = gen.config
  frames, height, width = planned_shape(gen, request)
  patch = tuple(config.data.patch)
  notes = dict(size_made=[height, width], frames_made=frames)
  tf = gen.temporal_factor
  latent_frames = 1 + (frames - 1) // tf if gen.vae is not None else frames
  shape_model = (latent_frames, height // gen.spatial_factor, width // gen.spatial_factor,
                 int(config.data.channels))
  given = np.zeros(shape_model, np.float32)
  cond_frames = np.zeros(latent_frames, bool)
  if request.mode != "t2v":
    source = _fit_input(read_media(request.input, gen.pixel_channels), (frames, height, width))
    if request.mode == "i2v":
      given[:1] = _to_model_space(gen, source[:1])
      cond_frames[0] = True
    elif request.mode == "extend":
      keep = min(len(source), frames - 1)
      keep = 1 + (keep - 1) // tf * tf if gen.vae is not None else keep  # whole latent frames only
      encoded = _to_model_space(gen, source[:keep])
      given[:len(encoded)] = encoded
      cond_frames[:len(encoded)] = True
      notes["given_frames"] = keep
    elif request.mode == "interpolate":
      clip = np.concatenate([source[:1], np.repeat(source[-1:], frames - 1, axis=0)])
      encoded = _to_model_space(gen, clip)
      given[0], given[-1] = encoded[0], encoded[-1]
      cond_frames[0] = cond_frames[-1] = True
      if gen.vae is not None:
        notes["approximation"] = "last latent frame = encoding of the last input frame held for 4 frames"
    elif request.mode == "sdedit":
      clip = source[:frames]
      if len(clip) < frames:
        clip = np.concatenate([clip, np.repeat(clip[-1:], frames - len(clip), axis=0)])
      given = _to_model_space(gen, clip)
  tokens, positions, grid = packing.patchify(given, patch)
  cond_mask = cond_frames[positions[:, 0] * patch[0]]
  example = dict(patches=tokens, positions=positions, grid=np.asarray(grid, np.int32), cond_mask=cond_mask,
                 id=index, label=int(config.model.get("num_classes", 0)), caption=request.prompt)
  return example, notes


def _text_of(gen: inference.Generator, prompts: list[str]) -> list[np.ndarray]:
  if gen.text_encoder is None:
    return [np.zeros((0, 0), np.float32) for _ in prompts]
  max_length = int(gen.config.get("text", {}).get("max_length", 32))
  tokens, mask = gen.text_encoder.encode(prompts, max_length=max_length)
  return [np.asarray(t)[np.asarray(m)] for t, m in zip(tokens, mask)]


def pack_requests(gen: inference.Generator, requests: list[Request]) -> tuple[list[dict], list[dict]]:
  """(packed rows, per-request notes). Each row also gets `strength` [K] (1 except SDEdit)."""
  data = gen.config.data
  examples, notes = [], []
  texts = _text_of(gen, [r.prompt for r in requests])
  for index, (request, text) in enumerate(zip(requests, texts)):
    example, note = request_example(gen, request, index)
    if example["patches"].shape[0] > data.tokens_per_row:
      raise ValueError(
          f"request {index} ({request.prompt!r}, {note['frames_made']} frames at {note['size_made']}) is "
          f"{example['patches'].shape[0]} tokens, more than one row holds (data.tokens_per_row="
          f"{data.tokens_per_row}); ask for a smaller size or fewer frames")
    if text.size:
      example["text"] = text
    examples.append(example)
    notes.append(note)
  rows = packing.pack_examples(examples, int(data.tokens_per_row), int(data.examples_per_row),
                               text_tokens_per_row=int(data.get("text_tokens_per_row", 0)))
  for row in rows:
    row["strength"] = np.array([requests[i].strength if i >= 0 and requests[i].mode == "sdedit" else 1.0
                                for i in row["example_ids"]], np.float32)
  return rows, notes


# --------------------------------------------------------------------------- sampling

def _sample_rows(gen: inference.Generator, rows: list[dict], *, sampler: str, steps: int, cfg_scale: float,
                 rows_per_call: int, seed: int, ddpm_strength: float = 1.0) -> dict[int, np.ndarray]:
  """{example id: its sample in model space [T', H', W', C]} of packed rows, rows_per_call rows
  to each compiled call (the last one padded with empty rows); call c draws from key seed * 1000 + c."""
  keys = [k for k in ("patches", "segment_ids", "positions", "cond_mask", "grid", "labels", "text",
                      "text_segment_ids", "strength") if k in rows[0]]
  eta = float(gen.config.sample.get("eta", 0.0))
  run = jax.jit(lambda params, batch, rng: dit_task.generate(
      gen.model, params, gen.config, batch, rng, sampler=sampler, steps=steps, cfg_scale=cfg_scale, eta=eta,
      ddpm_strength=ddpm_strength))
  samples = {}
  empty = {k: np.zeros_like(rows[0][k]) for k in keys}
  empty["labels"] = np.full_like(rows[0]["labels"], -1)
  for call, start in enumerate(range(0, len(rows), rows_per_call)):
    chunk = rows[start:start + rows_per_call]
    batch = {k: np.stack([r[k] for r in chunk] + [empty[k]] * (rows_per_call - len(chunk))) for k in keys}
    out = np.asarray(run(gen.params, batch, jax.random.PRNGKey(seed * 1000 + call)))
    for row, tokens in zip(chunk, out):
      for k, example_id in enumerate(row["example_ids"]):
        if example_id < 0:
          continue
        mask = row["segment_ids"] == k + 1
        samples[int(example_id)] = np.asarray(packing.unpatchify(
            tokens[mask], tuple(row["grid"][k]), tuple(gen.config.data.patch), int(gen.config.data.channels)))
  return samples


def sample_requests(gen: inference.Generator, requests: list[Request], *, sampler: str, steps: int, cfg_scale: float,
                    rows_per_call: int, seed: int = 0) -> tuple[list[np.ndarray], list[dict]]:
  """uint8 videos [T, H, W, C], one per request, and the per-request notes."""
  rows, notes = pack_requests(gen, requests)
  ddpm_strength = max([r.strength for r in requests if r.mode == "sdedit"], default=1.0)
  samples = _sample_rows(gen, rows, sampler=sampler, steps=steps, cfg_scale=cfg_scale, rows_per_call=rows_per_call,
                         seed=seed, ddpm_strength=ddpm_strength)
  return [_from_model_space(gen, samples[i]) for i in range(len(requests))], notes


# --------------------------------------------------------------------------- class grids

def class_rows(gen: inference.Generator, labels) -> list[dict]:
  """Packed rows of one example per label: an image of the model's one size (data.image_size)
  to be made from noise under that class."""
  data = gen.config.data
  side = int(data.image_size)
  blank = np.zeros((1, side, side, int(data.channels)), np.float32)
  tokens, positions, grid = packing.patchify(blank, tuple(data.patch))
  examples = [dict(patches=tokens, positions=positions, grid=np.asarray(grid, np.int32), id=i, label=int(label))
              for i, label in enumerate(labels)]
  return packing.pack_examples(examples, int(data.tokens_per_row), int(data.examples_per_row))


def sample_classes(gen: inference.Generator, labels, *, sampler: str, steps: int, cfg_scale: float,
                   seed: int = 0) -> np.ndarray:
  """uint8 images [N, H, W, C], one per class label, all in one compiled call (class grids are small)."""
  rows = class_rows(gen, labels)
  samples = _sample_rows(gen, rows, sampler=sampler, steps=steps, cfg_scale=cfg_scale, rows_per_call=len(rows),
                         seed=seed)
  return np.stack([_from_model_space(gen, samples[i])[0] for i in range(len(labels))])


def run_class_grid(gen: inference.Generator, out: str, *, sampler: str = "", steps: int = 0, cfg_scale=None,
                   per_class: int = 0, seed: int = 0) -> str:
  """per_class images of every class -> OUT/grid.png (a row per class), class_<c>.png and
  samples.jsonl; returns the grid's path. The rows are split over every device (the mesh
  inference.load_generator placed the params on)."""
  config = gen.config
  steps = steps or config.sample.steps
  sampler = sampler or config.sample.sampler
  cfg_scale = config.sample.cfg_scale if cfg_scale is None else cfg_scale
  per_class = per_class or config.sample.per_class
  classes = list(range(config.model.num_classes))
  labels = np.repeat(classes, per_class)
  start = time.time()
  with sharding.activate(sharding.data_mesh(config.mesh), sharding.logical_rules(config.mesh)):
    images = sample_classes(gen, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed)
  seconds = time.time() - start

  os.makedirs(out, exist_ok=True)
  records = []
  for c in classes:
    path = media.save_grid(images[c * per_class:(c + 1) * per_class], os.path.join(out, f"class_{c}.png"),
                           columns=per_class)
    records.append(dict(cls=c, file=os.path.basename(path), count=per_class, seed=seed, sampler=sampler,
                        steps=steps if sampler == "ddim" else config.diffusion.num_steps, cfg=cfg_scale,
                        checkpoint_step=gen.step))
  grid_path = media.save_grid(images, os.path.join(out, "grid.png"), columns=per_class)
  with open(os.path.join(out, "samples.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  print(f"sampled {len(labels)} images in {seconds:.1f}s -> {grid_path} (one row per class)", flush=True)
  return grid_path


# --------------------------------------------------------------------------- training media

MEDIA_PROMPTS = 4  # TensorBoard samples of a prompt model: its first sample.prompts
MEDIA_CLASSES = 10  # of a class-conditional model: one image of each of its first classes


def media_sampler(config, model):
  """What the training loop shows in TensorBoard at eval steps: sample(params, step) ->
  {tag: uint8 [T, H, W, C]} of a few fixed requests, or None for a model that does not sample
  (tasks other than dit, a prompt model without sample.prompts, an unconditional pixel model).

  Prompt models: the first MEDIA_PROMPTS of sample.prompts at sample.size / sample.frames, one
  tag each; class-conditional pixel models: one image of each of the first MEDIA_CLASSES classes
  as one grid. Sampler, steps, guidance and seed are the config's `sample` section and fixed, so
  the pictures of successive evaluations differ only by the params. The VAE and the text
  encoder are loaded once, here; call it under the run's mesh (sharding.activate).
  """
  if config.task != "dit" or "sample" not in config:
    return None
  cfg = config.sample
  settings = dict(sampler=cfg.sampler, steps=int(cfg.steps), cfg_scale=float(cfg.cfg_scale), seed=int(cfg.get("seed", 0)))
  gen = inference.with_conditioners(config, model, None)
  if dit_task.samples_from_prompts(config):
    prompts = list(cfg.get("prompts", ()))[:MEDIA_PROMPTS]
    if not prompts:
      return None
    requests = [Request(prompt=p, size=tuple(int(x) for x in cfg.size), frames=int(cfg.frames)) for p in prompts]

    def sample_prompts(params, step):
      videos, _ = sample_requests(dataclasses.replace(gen, params=params, step=step), requests,
                                  rows_per_call=int(cfg.get("rows_per_call", 4)), **settings)
      return {f"samples/{i}: {request.prompt}": video for i, (request, video) in enumerate(zip(requests, videos))}

    return sample_prompts
  classes = list(range(min(int(config.model.get("num_classes", 0)), MEDIA_CLASSES)))
  if not classes:
    return None

  def sample_class_grid(params, step):
    images = sample_classes(dataclasses.replace(gen, params=params, step=step), classes, **settings)
    return {"samples/classes": media.grid(images, columns=len(classes))[None]}

  return sample_class_grid


# --------------------------------------------------------------------------- outputs

def write_outputs(videos: list[np.ndarray], requests: list[Request], notes: list[dict], out: str, *,
                  gen: inference.Generator, sampler: str, steps: int, cfg_scale: float, seed: int) -> str:
  """media.save_sample's files per video and samples.jsonl; returns the manifest path."""
  os.makedirs(out, exist_ok=True)
  manifest = os.path.join(out, "samples.jsonl")
  with open(manifest, "w") as f:
    for i, (video, request, note) in enumerate(zip(videos, requests, notes)):
      files = media.save_sample(video, out, f"sample_{i}")
      record = dict(prompt=request.prompt, mode=request.mode, input=request.input,
                    strength=request.strength if request.mode == "sdedit" else None,
                    size_asked=list(request.size), frames_asked=request.frames, **note,
                    seed=seed, sampler=sampler, steps=steps, cfg=cfg_scale,
                    checkpoint_step=gen.step, files=files)
      f.write(json.dumps(record) + "\n")
  return manifest


def run(gen: inference.Generator, requests: list[Request], out: str, *, sampler: str = "", steps: int = 0,
        cfg_scale=None, rows_per_call: int = 0, seed: int = 0) -> str:
  cfg = gen.config.sample
  sampler = sampler or cfg.sampler
  steps = steps or cfg.steps
  cfg_scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
  rows_per_call = rows_per_call or int(cfg.get("rows_per_call", 4))
  start = time.time()
  videos, notes = sample_requests(gen, requests, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                  rows_per_call=rows_per_call, seed=seed)
  manifest = write_outputs(videos, requests, notes, out, gen=gen, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                           seed=seed)
  kind = "images" if all(len(v) == 1 for v in videos) else "videos"
  print(f"sampled {len(videos)} {kind} in {time.time() - start:.1f}s -> {manifest}", flush=True)
  return manifest
