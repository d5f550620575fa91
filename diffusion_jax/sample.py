"""All sampling: prompts (text-to-video and -image, image-to-video, extension forward and
backward, interpolation, joining two clips, SDEdit, long videos) and class grids, each as packed
rows through one generator (dit_task.generate).

  python -m diffusion_jax sample --workdir=/tmp/vdit --prompt="a red 3 moving quickly to the right"
  python -m diffusion_jax sample --workdir=/tmp/vdit --prompts=prompts.jsonl

A request is one video to make: a prompt, a size (height, width in pixels), a
number of frames, a mode and, for the conditioned modes, an input file:

  t2v              text only
  i2v              --input an image (or a video: its first frame) becomes frame 0
  extend           --input a video; its frames (its first --keep) are kept and the clip continues
  extend-backward  --input a video; its frames (its last --keep) end the clip, what came before is made
  interpolate      --input a video: its first and last frames are kept, the middle is made
  join             --input clip A, --input-b clip B: A's last --keep frames (default 1) open the
                   clip, B's first --keep close it, the transition between is made
  sdedit           --input a video: noised to --strength (0..1) and denoised under the prompt
  long             any number of frames: windows of at most one row (--window frames), each an
                   extension of the video so far from its last --overlap latent frames;
                   an optional --input opens the video

Every request may carry a negative prompt (--negative-prompt: CFG's unconditional branch reads it
instead of the null caption; text models only) and --expand (the prompt becomes the dense
moving_digits caption of moving_digits.expand_caption before it is encoded; the manifest records both).

A prompts file is JSON lines with the same fields ({"prompt", "size", "frames",
"mode", "input", "input_b", "strength", "negative", "keep", "overlap", "window",
"expand"}); missing fields take the flags' values. The noise of call i of a run
comes from the key (seed, i) (folded with the window number for long's later
windows): the same requests and seed give the same videos.

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
causality a prefix of frames encodes to exactly a prefix of latents, so i2v,
extension and join's start are exact; frames at the end (extend-backward,
join's clip B) are encoded after one copy of their first frame, and for
interpolation the last latent frame is the encoding of the clip's last frame
held for the final four frames: approximations the manifest states.

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
import io
import json
import os
import time

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import inference, media, patches, paths, sharding
from diffusion_jax.data import imaging, moving_digits, packing
from diffusion_jax.train import dit_task

MODES = ("t2v", "i2v", "extend", "extend-backward", "interpolate", "join", "sdedit", "long")
NEEDS_INPUT = ("i2v", "extend", "extend-backward", "interpolate", "join", "sdedit")  # long: optional
ASPECT_TOLERANCE = 0.02  # join: inputs whose height/width ratios differ by more are refused, not stretched


@dataclasses.dataclass
class Request:
  prompt: str
  size: tuple[int, int]
  frames: int
  mode: str = "t2v"
  input: str = ""
  strength: float = 0.7
  input_b: str = ""  # join: clip B, whose first frames end the video
  negative: str = ""  # negative prompt: CFG's unconditional branch reads it instead of the null caption
  keep: int = 0  # extend, extend-backward, join: input frames kept (0: all; join: 1 of each clip)
  overlap: int = 0  # long: latent frames consecutive windows share (0: half a window)
  window: int = 0  # long: frames per window (0: the config's sample.frames)
  expand: bool = False  # prompt -> the dense moving_digits caption (moving_digits.expand_caption)


_FIELD_TYPES = dict(prompt=str, mode=str, input=str, strength=float, input_b=str, negative=str, keep=int, overlap=int,
                    window=int, expand=bool, frames=int)


def parse_requests(prompts: list[str], prompts_file: str, defaults: dict) -> list[Request]:
  """Requests from --prompt flags and a JSON-lines file; each field defaults to `defaults`."""
  records = [dict(prompt=p) for p in prompts]
  if prompts_file:
    if not paths.isfile(prompts_file):
      raise FileNotFoundError(f"prompts file {prompts_file} does not exist")
    for number, line in enumerate(paths.read_text(prompts_file).splitlines(), 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{prompts_file}:{number} is not a JSON object: {e}") from e
  if not records:
    raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE.jsonl")
  names = {f.name for f in dataclasses.fields(Request)}
  requests = []
  for record in records:
    unknown = set(record) - names
    if unknown:
      raise ValueError(f"unknown request fields {sorted(unknown)} in {record}")
    fields = {**defaults, **record}
    values = {name: kind(fields[name]) for name, kind in _FIELD_TYPES.items() if name in fields}
    request = Request(size=tuple(int(x) for x in fields["size"]), **values)
    if request.mode not in MODES:
      raise ValueError(f"unknown mode {request.mode!r} for prompt {request.prompt!r}; use one of {MODES}")
    if request.mode in NEEDS_INPUT and not request.input:
      raise ValueError(f"mode {request.mode!r} needs an input image or video (prompt {request.prompt!r})")
    if request.mode == "join" and not request.input_b:
      raise ValueError(f"mode 'join' needs two inputs: --input (clip A, its last frames start the video) and "
                       f"--input-b (clip B, its first frames end it) (prompt {request.prompt!r})")
    if not 0.0 < request.strength <= 1.0:
      raise ValueError(f"strength must be in (0, 1], got {request.strength}")
    for name in ("keep", "overlap", "window"):
      if getattr(request, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(request, name)} (prompt {request.prompt!r})")
    requests.append(request)
  return requests


def model_prompt(request: Request) -> str:
  """The text the model is conditioned on: the prompt, or its dense expansion with `expand`."""
  if not request.expand:
    return request.prompt
  return moving_digits.expand_caption(request.prompt, frames=request.frames)


def read_media(path: str, channels: int) -> np.ndarray:
  """uint8 [T, H, W, C] from an image or a video file; a clear error naming the file otherwise."""
  if not paths.isfile(path):
    raise FileNotFoundError(f"input {path} does not exist")
  source = io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path
  if path.endswith(".npz"):
    with np.load(source, allow_pickle=False) as data:
      frames = data["frames"]
  else:
    try:
      frames = np.asarray(iio.imread(source, index=None, extension=os.path.splitext(path)[1] or None))
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


# --------------------------------------------------------------------------- frames and units

# A "unit" is one step of the model's time axis: a latent frame of a causal video VAE (the first
# covers frame 0 alone, each later one temporal_factor frames), or a temporal patch of pixels.

def _unit(gen: inference.Generator) -> int:
  return gen.temporal_factor if gen.vae is not None else int(gen.config.data.patch[0])


def _frames_of_units(gen: inference.Generator, units: int) -> int:
  """Frames of a clip of `units` units that starts at frame 0."""
  return 1 + _unit(gen) * (units - 1) if gen.vae is not None else units * _unit(gen)


def _units_of_frames(gen: inference.Generator, frames: int) -> int:
  return 1 + (frames - 1) // _unit(gen) if gen.vae is not None else frames // _unit(gen)


def _tokens_per_unit(gen: inference.Generator, height: int, width: int) -> int:
  _, ph, pw = gen.config.data.patch
  return (height // gen.spatial_factor // ph) * (width // gen.spatial_factor // pw)


def pixel_factors(gen: inference.Generator) -> tuple[int, int]:
  """(height, width) in pixels of one token: the VAE's spatial factor times the patch; the sides
  of what the model makes are multiples of these."""
  _, ph, pw = gen.config.data.patch
  return gen.spatial_factor * int(ph), gen.spatial_factor * int(pw)


def planned_shape(gen: inference.Generator, request: Request) -> tuple[int, int, int]:
  """(frames, height, width) in pixels that the model makes for a request (the rounding rule above)."""
  if gen.config.data.fixed_size:  # a fixed-size image model (e.g. the U-Net): one size only
    side = int(gen.config.data.image_size) * gen.spatial_factor
    return 1, side, side
  fh, fw = pixel_factors(gen)
  height = max(fh, request.size[0] // fh * fh)
  width = max(fw, request.size[1] // fw * fw)
  frames = _frames_of_units(gen, max(1, _units_of_frames(gen, max(request.frames, 1))))
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


def _encode_start(gen: inference.Generator, frames: np.ndarray) -> np.ndarray:
  """Model-space units of frames that open a clip (_frames_of_units(n) frames -> n units): exact,
  since a causal VAE encodes a prefix of a clip to exactly a prefix of its latents."""
  return _to_model_space(gen, frames)


def _encode_end(gen: inference.Generator, frames: np.ndarray) -> np.ndarray:
  """Model-space units of frames that close a clip (m whole units of frames -> m units). A latent
  unit depends on the frames before it, which are yet to be made: the frames are encoded after one
  copy of their first frame, a stand-in context (the approximation the manifest states)."""
  if gen.vae is None:
    return _to_model_space(gen, frames)
  return _to_model_space(gen, np.concatenate([frames[:1], frames]))[1:]


def _hold_to(frames: np.ndarray, count: int, at_end: bool) -> np.ndarray:
  """`count` frames: the clip's last `count` (at_end) or first `count`; a shorter clip (an image) is
  padded by holding its first frame in front (at_end) or its last frame after it."""
  if len(frames) >= count:
    return frames[len(frames) - count:] if at_end else frames[:count]
  pad = np.repeat(frames[:1] if at_end else frames[-1:], count - len(frames), axis=0)
  return np.concatenate([pad, frames] if at_end else [frames, pad])


def _fit_input(frames: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  """The input resized to (height, width) (bilinear) with its frame count unchanged."""
  t, h, w = shape
  resized = imaging.resize_frames(frames.astype(np.float32), h, w)
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def load_inputs(gen: inference.Generator, request: Request, shape: tuple[int, int, int]) -> list[np.ndarray]:
  """The request's input clips (join: A and B), read and resized to the size made. Join's two
  clips may differ in size (both are resized) but not in aspect ratio (that would stretch one)."""
  paths = [p for p in (request.input, request.input_b if request.mode == "join" else "") if p]
  clips = [read_media(p, gen.pixel_channels) for p in paths]
  if len(clips) == 2:
    (ha, wa), (hb, wb) = clips[0].shape[1:3], clips[1].shape[1:3]
    if abs(ha / wa - hb / wb) > ASPECT_TOLERANCE * (ha / wa):
      raise ValueError(f"join: clip A ({paths[0]}, {ha}x{wa}) and clip B ({paths[1]}, {hb}x{wb}) have different "
                       f"aspect ratios; both are resized to the size made ({shape[1]}x{shape[2]}), which would "
                       "stretch one of them: crop them to one aspect ratio first")
  return [_fit_input(c, shape) for c in clips]


# --------------------------------------------------------------------------- requests -> examples

def _check_fits(gen: inference.Generator, request: Request, index: int, units: int, height: int, width: int) -> None:
  tokens, budget = units * _tokens_per_unit(gen, height, width), int(gen.config.data.tokens_per_row)
  if tokens > budget:
    raise ValueError(
        f"request {index} ({request.prompt!r}, {_frames_of_units(gen, units)} frames at {[height, width]}) is "
        f"{tokens} tokens, more than one row holds (data.tokens_per_row={budget}); ask for a smaller size or "
        "fewer frames, or --mode=long for a longer video")


def conditioned_clip(gen: inference.Generator, request: Request, index: int, shape: tuple[int, int, int],
                     clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float, dict]:
  """(given [T', H', W', C] in model space, cond_frames [T'] bool, strength, notes) of one
  request of a single-pass mode: the given units at their places, zeros (noise) elsewhere."""
  config = gen.config
  frames, height, width = shape
  units = _units_of_frames(gen, frames)
  mf = 1 if gen.vae is not None else _unit(gen)  # model-space frames per unit
  notes = dict(size_made=[height, width], frames_made=frames)
  given = np.zeros((units * mf, height // gen.spatial_factor, width // gen.spatial_factor, int(config.data.channels)),
                   np.float32)
  cond = np.zeros(units * mf, bool)
  strength, mode = 1.0, request.mode
  if mode == "i2v":
    given[:1] = _encode_start(gen, clips[0][:1])
    cond[0] = True
  elif mode == "extend":
    keep_units = _units_of_frames(gen, min(request.keep or len(clips[0]), len(clips[0])))
    keep_units = max(1, min(keep_units, units - 1))  # whole units, at least one made
    keep = _frames_of_units(gen, keep_units)
    given[:keep_units * mf] = _encode_start(gen, _hold_to(clips[0], keep, at_end=False))
    cond[:keep_units * mf] = True
    notes["given_frames"] = min(keep, len(clips[0]))
  elif mode == "extend-backward":
    source = clips[0][-request.keep:] if request.keep else clips[0]
    keep_units = max(1, len(source) // _unit(gen))  # whole units; a shorter input (an image) is held
    row_units = int(config.data.tokens_per_row) // _tokens_per_unit(gen, height, width)
    if keep_units >= row_units:
      raise ValueError(
          f"extend-backward: input {request.input} keeps {len(source)} frames; at {height}x{width} a row "
          f"(data.tokens_per_row={config.data.tokens_per_row}) holds {_frames_of_units(gen, row_units)} frames, "
          "which leaves nothing to generate before them: trim the input (--keep) or ask a smaller --size")
    if keep_units >= units:
      raise ValueError(
          f"extend-backward: frames={request.frames} leaves nothing to generate before the "
          f"{keep_units * _unit(gen)} given frames of {request.input}: ask for more frames (or --keep fewer)")
    given[(units - keep_units) * mf:] = _encode_end(gen, _hold_to(source, keep_units * _unit(gen), at_end=True))
    cond[(units - keep_units) * mf:] = True
    notes["given_frames"] = min(keep_units * _unit(gen), len(source))
    if gen.vae is not None:
      notes["approximation"] = "the given frames are encoded after a copy of their first frame (causal context)"
  elif mode == "join":
    keep = request.keep or 1
    start_units = _units_of_frames(gen, keep) if gen.vae is not None else max(1, keep // _unit(gen))
    end_units = max(1, keep // _unit(gen))
    if start_units + end_units >= units:
      raise ValueError(
          f"join: frames={request.frames} leaves no transition between the {_frames_of_units(gen, start_units)} "
          f"frames kept from {request.input} and the {end_units * _unit(gen)} from {request.input_b}: ask for "
          "more frames (or --keep fewer)")
    given[:start_units * mf] = _encode_start(gen, _hold_to(clips[0], _frames_of_units(gen, start_units), at_end=True))
    given[(units - end_units) * mf:] = _encode_end(gen, _hold_to(clips[1], end_units * _unit(gen), at_end=False))
    cond[:start_units * mf] = cond[(units - end_units) * mf:] = True
    notes.update(given_frames_start=_frames_of_units(gen, start_units), given_frames_end=end_units * _unit(gen),
                 transition_frames=frames - _frames_of_units(gen, start_units) - end_units * _unit(gen))
    if gen.vae is not None:
      notes["approximation"] = "clip B's frames are encoded after a copy of their first frame (causal context)"
  elif mode == "interpolate":
    clip = np.concatenate([clips[0][:1], np.repeat(clips[0][-1:], frames - 1, axis=0)])
    encoded = _to_model_space(gen, clip)
    given[0], given[-1] = encoded[0], encoded[-1]
    cond[0] = cond[-1] = True
    if gen.vae is not None:
      notes["approximation"] = "last latent frame = encoding of the last input frame held for 4 frames"
  elif mode == "sdedit":
    given = _to_model_space(gen, _hold_to(clips[0], frames, at_end=False))
    strength = request.strength
  return given, cond, strength, notes


def _example_of(gen: inference.Generator, given: np.ndarray, cond: np.ndarray, index: int) -> dict:
  patch = tuple(gen.config.data.patch)
  tokens, positions, grid = patches.patchify(given, patch)
  return dict(patches=tokens, positions=positions, grid=np.asarray(grid, np.int32), cond_mask=cond[positions[:, 0] * patch[0]],
              id=index, label=int(gen.config.model.get("num_classes", 0)))


def request_example(gen: inference.Generator, request: Request, index: int) -> tuple[dict, dict]:
  """(packer example, notes) of one single-pass request: noise-space placeholders plus the given tokens
  and its SDEdit `strength` (1 for the other modes)."""
  shape = planned_shape(gen, request)
  _check_fits(gen, request, index, _units_of_frames(gen, shape[0]), shape[1], shape[2])
  given, cond, strength, notes = conditioned_clip(gen, request, index, shape, load_inputs(gen, request, shape))
  return dict(_example_of(gen, given, cond, index), strength=strength), notes


def _text_of(gen: inference.Generator, prompts: list[str]) -> list[np.ndarray]:
  if gen.text_encoder is None:
    return [np.zeros((0, 0), np.float32) for _ in prompts]
  max_length = int(gen.config.get("text", {}).get("max_length", 32))
  tokens, mask = gen.text_encoder.encode(prompts, max_length=max_length)
  return [np.asarray(t)[np.asarray(m)] for t, m in zip(tokens, mask)]


def check_negatives(gen: inference.Generator, requests: list[Request], cfg_scale: float) -> None:
  """A negative prompt needs a text model and guidance; anything else is an error naming the request."""
  for index, request in enumerate(requests):
    if not request.negative:
      continue
    if gen.text_encoder is None:
      raise ValueError(f"request {index} ({request.prompt!r}) has a negative prompt, but this model has no text "
                       "conditioning (model.text_dim=0): negative prompts need a text-conditioned model")
    if cfg_scale == 1.0:
      raise ValueError(f"request {index} ({request.prompt!r}) has a negative prompt, which acts through "
                       "classifier-free guidance; --cfg-scale=1 turns guidance off (use a scale other than 1)")


def pack_jobs(gen: inference.Generator, examples: list[dict], prompts: list[str], negatives: list[str]) -> list[dict]:
  """Packed rows of examples (each with `strength`) and their prompts. Each row also gets `strength`
  [K]; when any example has a negative prompt, its tokens follow the caption's in `text` and rows get
  negative_text_segment_ids [Lt], the text CFG's unconditional half reads (the negative prompt's
  tokens where there is one, else the caption's, which has_negative [K] False turns into the null
  caption; dit_task.generate)."""
  data = gen.config.data
  texts = _text_of(gen, prompts)
  with_negative = any(negatives)
  negative_texts = _text_of(gen, negatives) if with_negative else [np.zeros((0, 0), np.float32)] * len(prompts)
  budget = int(data.get("text_tokens_per_row", 0))
  examples = [dict(ex) for ex in examples]
  for example in examples:
    text, negative = texts[example["id"]], negative_texts[example["id"]]
    if text.size:
      example["text"] = np.concatenate([text, negative]) if negative.size else text
      if budget and len(example["text"]) > budget:
        raise ValueError(f"the prompt and negative prompt of {prompts[example['id']]!r} are {len(example['text'])} "
                         f"text tokens, more than a row's data.text_tokens_per_row={budget}")
  strengths = {ex["id"]: ex.pop("strength", 1.0) for ex in examples}
  rows = packing.pack_examples(examples, int(data.tokens_per_row), int(data.examples_per_row),
                               text_tokens_per_row=budget)
  for row in rows:
    ids = [int(i) for i in row["example_ids"]]
    row["strength"] = np.array([strengths[i] if i >= 0 else 1.0 for i in ids], np.float32)
    if with_negative:
      row["has_negative"] = np.array([i >= 0 and negative_texts[i].size > 0 for i in ids], bool)
      caption_ids, uncond_ids = row["text_segment_ids"].copy(), row["text_segment_ids"].copy()
      for k, i in enumerate(ids):
        if i >= 0 and negative_texts[i].size:  # the example's tokens: its caption, then its negative prompt
          where = np.flatnonzero(row["text_segment_ids"] == k + 1)
          caption_ids[where[len(texts[i]):]] = 0
          uncond_ids[where[:len(texts[i])]] = 0
      row["text_segment_ids"], row["negative_text_segment_ids"] = caption_ids, uncond_ids
  return rows


def pack_requests(gen: inference.Generator, requests: list[Request]) -> tuple[list[dict], list[dict]]:
  """(packed rows, per-request notes) of single-pass requests (pack_jobs; example id = request index)."""
  built = [request_example(gen, r, i) for i, r in enumerate(requests)]
  rows = pack_jobs(gen, [b[0] for b in built], [model_prompt(r) for r in requests], [r.negative for r in requests])
  return rows, [b[1] for b in built]


# --------------------------------------------------------------------------- long: sliding windows

@dataclasses.dataclass
class _Long:
  """A `long` request in progress: its video so far (uint8) and its window plan in units."""
  index: int
  request: Request
  shape: tuple[int, int, int]
  window_units: int
  overlap_units: int
  video: np.ndarray = None
  windows: int = 0


def plan_long(gen: inference.Generator, request: Request, index: int) -> tuple[_Long, dict]:
  """The window plan of a `long` request. A window is at most one row: `window` frames (default the
  config's sample.frames) capped at what a row holds at the size; consecutive windows share `overlap`
  units, so each adds window - overlap units. Row budget: (overlap + 1) units x tokens per unit <=
  data.tokens_per_row, else an error that names it."""
  frames, height, width = planned_shape(gen, request)
  per_unit = _tokens_per_unit(gen, height, width)
  budget = int(gen.config.data.tokens_per_row)
  row_units = budget // per_unit
  window_units = _units_of_frames(gen, request.window or int(gen.config.sample.frames))
  window_units = max(1, min(window_units, row_units))
  overlap = request.overlap or max(1, window_units // 2)
  if overlap + 1 > row_units:
    raise ValueError(
        f"long: request {index} ({request.prompt!r}) at {height}x{width} is {per_unit} tokens a unit; a window "
        f"needs the {overlap} overlap units plus one new one, {(overlap + 1) * per_unit} tokens, more than "
        f"data.tokens_per_row={budget}: ask a smaller --size or a smaller --overlap")
  if overlap >= window_units:
    raise ValueError(f"long: --overlap={overlap} must be smaller than the window's {window_units} units "
                     f"({_frames_of_units(gen, window_units)} frames); raise --window or lower --overlap")
  plan = _Long(index, request, (frames, height, width), window_units, overlap)
  notes = dict(size_made=[height, width], frames_made=frames, window_frames=_frames_of_units(gen, window_units),
               overlap_units=overlap, tokens_per_window=window_units * per_unit, row_budget_needed=(overlap + 1) * per_unit)
  if request.input:
    [clip] = load_inputs(gen, request, plan.shape)
    clip = clip[:_frames_of_units(gen, max(1, _units_of_frames(gen, len(clip))))]  # whole units
    if len(clip) >= frames:
      raise ValueError(f"long: input {request.input} already has {len(clip)} frames; frames={request.frames} asks "
                       "for none after it")
    if gen.vae is not None:  # the input as the decoder renders it, so the continuation matches its colours
      clip = _from_model_space(gen, _to_model_space(gen, clip))
    plan.video = clip
    notes["given_frames"] = len(clip)
  return plan, notes


def _next_window(gen: inference.Generator, plan: _Long) -> tuple[dict, int]:
  """(example, frames it keeps) of the plan's next window: t2v for the first one without an input,
  else an extension whose kept units are the last `overlap` units of the video so far."""
  frames, height, width = plan.shape
  index = plan.index
  if plan.video is None:
    units = min(plan.window_units, _units_of_frames(gen, frames))
    window = dataclasses.replace(plan.request, mode="t2v", frames=_frames_of_units(gen, units))
    given, cond, _, _ = conditioned_clip(gen, window, index, (window.frames, height, width), [])
    return _example_of(gen, given, cond, index), 0
  if gen.vae is not None:
    kept = _frames_of_units(gen, min(plan.overlap_units, _units_of_frames(gen, len(plan.video))))
  else:
    kept = min(plan.overlap_units * _unit(gen), len(plan.video) // _unit(gen) * _unit(gen))
  kept_units = _units_of_frames(gen, kept)
  new_units = min(plan.window_units - kept_units, (frames - len(plan.video)) // _unit(gen))
  if new_units < 1:  # cannot happen for whole-unit videos; a guard against an endless loop
    raise ValueError(f"long: request {index} cannot add a whole unit of frames to its {len(plan.video)} frames")
  window = dataclasses.replace(plan.request, mode="extend", keep=kept,
                               frames=_frames_of_units(gen, kept_units + new_units))
  given, cond, _, _ = conditioned_clip(gen, window, index, (window.frames, height, width), [plan.video[-kept:]])
  return _example_of(gen, given, cond, index), kept


# --------------------------------------------------------------------------- sampling

def _compiled_generate(gen: inference.Generator, *, sampler: str, steps: int, cfg_scale: float):
  eta = float(gen.config.sample.get("eta", 0.0))
  return jax.jit(lambda params, batch, rng: dit_task.generate(
      gen.model, params, gen.config, batch, rng, sampler=sampler, steps=steps, cfg_scale=cfg_scale, eta=eta))


def _sample_rows(gen: inference.Generator, rows: list[dict], run, *, rows_per_call: int, seed: int,
                 step: int = 0) -> dict[int, np.ndarray]:
  """{example id: its sample in model space [T', H', W', C]} of packed rows, rows_per_call rows
  to each compiled call (the last one padded with empty rows); call c draws from key seed * 1000 + c
  (folded with `step` for the later windows of long requests)."""
  keys = [k for k in ("patches", "segment_ids", "positions", "cond_mask", "grid", "labels", "text",
                      "text_segment_ids", "strength", "negative_text_segment_ids", "has_negative") if k in rows[0]]
  samples = {}
  empty = {k: np.zeros_like(rows[0][k]) for k in keys}
  empty["labels"] = np.full_like(rows[0]["labels"], -1)
  for call, start in enumerate(range(0, len(rows), rows_per_call)):
    chunk = rows[start:start + rows_per_call]
    batch = {k: np.stack([r[k] for r in chunk] + [empty[k]] * (rows_per_call - len(chunk))) for k in keys}
    key = jax.random.PRNGKey(seed * 1000 + call)
    out = np.asarray(run(gen.params, batch, jax.random.fold_in(key, step) if step else key))
    for row, tokens in zip(chunk, out):
      for k, example_id in enumerate(row["example_ids"]):
        if example_id < 0:
          continue
        mask = row["segment_ids"] == k + 1
        samples[int(example_id)] = np.asarray(patches.unpatchify(
            tokens[mask], tuple(row["grid"][k]), tuple(gen.config.data.patch), int(gen.config.data.channels)))
  return samples


def sample_requests(gen: inference.Generator, requests: list[Request], *, sampler: str, steps: int, cfg_scale: float,
                    rows_per_call: int, seed: int = 0) -> tuple[list[np.ndarray], list[dict]]:
  """uint8 videos [T, H, W, C], one per request, and the per-request notes.

  Every request's first pass is packed into the same rows; `long` requests then take further
  passes, one window each, packed together, until each has its frames."""
  check_negatives(gen, requests, cfg_scale)
  run = _compiled_generate(gen, sampler=sampler, steps=steps, cfg_scale=cfg_scale)
  prompts = [model_prompt(r) for r in requests]
  negatives = [r.negative for r in requests]
  examples, notes, plans = [], [None] * len(requests), {}
  for index, request in enumerate(requests):
    if request.mode == "long":
      plans[index], notes[index] = plan_long(gen, request, index)
    else:
      example, notes[index] = request_example(gen, request, index)
      examples.append(example)
  videos = [None] * len(requests)
  step = 0
  while examples or any(p.video is None or len(p.video) < p.shape[0] for p in plans.values()):
    kept = {}
    for index, plan in plans.items():
      if plan.video is None or len(plan.video) < plan.shape[0]:
        example, kept[index] = _next_window(gen, plan)
        examples.append(example)
    rows = pack_jobs(gen, examples, prompts, negatives)
    samples = _sample_rows(gen, rows, run, rows_per_call=rows_per_call, seed=seed, step=step)
    for example in examples:
      index = example["id"]
      made = _from_model_space(gen, samples[index])
      if index not in plans:
        videos[index] = made
        continue
      plan = plans[index]
      plan.video = made if plan.video is None else np.concatenate([plan.video, made[kept[index]:]])
      plan.windows += 1
    examples, step = [], step + 1
  for index, plan in plans.items():
    videos[index] = plan.video
    notes[index]["windows"] = plan.windows
  for index, request in enumerate(requests):
    if request.expand:
      notes[index]["prompt_expanded"] = prompts[index]
  return videos, notes


# --------------------------------------------------------------------------- class grids

def class_rows(gen: inference.Generator, labels) -> list[dict]:
  """Packed rows of one example per label: an image of the model's one size (data.image_size)
  to be made from noise under that class."""
  data = gen.config.data
  side = int(data.image_size)
  blank = np.zeros((1, side, side, int(data.channels)), np.float32)
  tokens, positions, grid = patches.patchify(blank, tuple(data.patch))
  examples = [dict(patches=tokens, positions=positions, grid=np.asarray(grid, np.int32), id=i, label=int(label))
              for i, label in enumerate(labels)]
  return packing.pack_examples(examples, int(data.tokens_per_row), int(data.examples_per_row))


def sample_classes(gen: inference.Generator, labels, *, sampler: str, steps: int, cfg_scale: float,
                   seed: int = 0) -> np.ndarray:
  """uint8 images [N, H, W, C], one per class label, all in one compiled call (class grids are small)."""
  rows = class_rows(gen, labels)
  run = _compiled_generate(gen, sampler=sampler, steps=steps, cfg_scale=cfg_scale)
  samples = _sample_rows(gen, rows, run, rows_per_call=len(rows), seed=seed)
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

  records = []
  with paths.local_dir(out) as local_out:  # a bucket gets the files when they are all written
    for c in classes:
      path = media.save_grid(images[c * per_class:(c + 1) * per_class], os.path.join(local_out, f"class_{c}.png"),
                             columns=per_class)
      records.append(dict(cls=c, file=os.path.basename(path), count=per_class, seed=seed, sampler=sampler,
                          steps=steps if sampler == "ddim" else config.diffusion.num_steps, cfg=cfg_scale,
                          checkpoint_step=gen.step))
    media.save_grid(images, os.path.join(local_out, "grid.png"), columns=per_class)
    with open(os.path.join(local_out, "samples.jsonl"), "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  grid_path = paths.join(out, "grid.png")
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
  with paths.local_dir(out) as local_out:  # a bucket gets the files when they are all written
    _write_local_outputs(videos, requests, notes, local_out, gen=gen, sampler=sampler, steps=steps,
                         cfg_scale=cfg_scale, seed=seed)
  return paths.join(out, "samples.jsonl")


def _write_local_outputs(videos, requests, notes, out: str, *, gen, sampler, steps, cfg_scale, seed) -> None:
  manifest = os.path.join(out, "samples.jsonl")
  with open(manifest, "w") as f:
    for i, (video, request, note) in enumerate(zip(videos, requests, notes)):
      files = media.save_sample(video, out, f"sample_{i}")
      record = dict(prompt=request.prompt, mode=request.mode, input=request.input,
                    **({"input_b": request.input_b} if request.mode == "join" else {}),
                    strength=request.strength if request.mode == "sdedit" else None,
                    **({"negative": request.negative} if request.negative else {}),
                    size_asked=list(request.size), frames_asked=request.frames, **note,
                    seed=seed, sampler=sampler, steps=steps, cfg=cfg_scale,
                    checkpoint_step=gen.step, files=files)
      f.write(json.dumps(record) + "\n")


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
