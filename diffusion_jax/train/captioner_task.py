"""The captioner task: models/captioner.py trained with CoCa's two losses on captioned clips.

  loss = caption_weight * next-token cross-entropy (mean over caption tokens)
       + contrastive_weight * symmetric video-text InfoNCE over the batch (pooled embeddings)

In the contrastive loss, examples of a batch whose captions are identical are
all positives of each other (the target is spread evenly over them), so a
repeated caption is not pushed away from its own clips.

Batches are fixed-shape (one clip per row): pixels uint8 [B, F, S, S, 3], mask
uint8 [B, F, S, S] (models.captioner.prepare_clip), text int32 [B, L]
(model-vocabulary rows: BOS, caption, EOS, PAD).

Held-out evaluation (eval_fn / summarize_eval): the caption loss, greedy
captions parsed back with moving_digits.caption_attributes and compared with the
true caption's attributes one by one (digit, colour, background, direction,
speed, bouncing; the motion ones also over moving clips alone, since a one-frame
clip's caption has no motion), and the contrastive head's top-1 retrieval
within each eval batch, both ways (a hit when the retrieved caption equals the
true one).

Task interface: see the TASKS comment in train/loop.py.
"""
import dataclasses
import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.config import ConfigError
from diffusion_jax.data import moving_digits, pipeline, sources
from diffusion_jax.models import captioner as captioner_lib
from diffusion_jax.train import classifier_task

ATTRIBUTES = {"digit": "digits", "colour": "colours", "background": "background", "direction": "directions",
              "speed": "speeds", "bouncing": "bounced"}  # metric name -> caption_attributes key
MOTION_ATTRIBUTES = ("direction", "speed", "bouncing")
GEOMETRY_FEATURES = 11  # per frame, see clip_inputs
MOVE_SCALE = 10.0  # the centroid's move per frame is ~0.02-0.09 canvas sides: scaled up to ~unit size


def validate(config) -> None:
  model = config.model
  if int(model.crop) < 8 or int(model.crop) % 2 ** len(model.crop_widths):
    raise ConfigError(f"model.crop={model.crop} must be >= 8 and divisible by 2^{len(model.crop_widths)} "
                      f"(one 2x pooling per entry of model.crop_widths={tuple(model.crop_widths)})")
  if int(model.frames) < 1 or int(model.canvas) < 8:
    raise ConfigError(f"model.frames={model.frames} must be >= 1 and model.canvas={model.canvas} >= 8")
  if int(model.max_length) < 3:
    raise ConfigError(f"model.max_length={model.max_length} must be >= 3 (BOS, one token, EOS)")
  if int(model.width) % int(model.heads):
    raise ConfigError(f"model.width={model.width} must be divisible by model.heads={model.heads}")
  if len(model.token_ids) < 4 or tuple(model.token_ids[:3]) != captioner_lib.caption_token_ids()[:3]:
    raise ConfigError("model.token_ids must start with the MiniLM ids of [PAD], [CLS], [SEP] "
                      "(configs/captioner.py fills it from models.captioner.caption_token_ids())")


def build_model(config) -> captioner_lib.Captioner:
  m = config.model
  return captioner_lib.Captioner(
      vocab_size=len(m.token_ids), max_length=int(m.max_length), frames=int(m.frames), crop=int(m.crop),
      crop_widths=tuple(int(w) for w in m.crop_widths), width=int(m.width), heads=int(m.heads),
      encoder_layers=int(m.encoder_layers), unimodal_layers=int(m.unimodal_layers),
      multimodal_layers=int(m.multimodal_layers), embed_dim=int(m.embed_dim),
      dtype=jnp.dtype(config.train.compute_dtype))


def init_params(model, config, rng):
  m = config.model
  crops = jnp.zeros((1, m.frames, m.crop, m.crop, 3), jnp.float32)
  return model.init(rng, crops, jnp.zeros((1, m.frames, GEOMETRY_FEATURES), jnp.float32),
                    jnp.zeros((1, m.max_length - 1), jnp.int32))["params"]


def clip_inputs(pixels, mask, crop: int):
  """The encoder's inputs from prepared clips (models.captioner.prepare_clip): pixels uint8
  [B, F, S, S, 3], mask [B, F, S, S] -> (crops float [B, F, crop, crop, 3] in [-1, 1], geometry float
  [B, F, GEOMETRY_FEATURES]). Fixed, not learned: each frame's foreground window (classifier_task.
  digit_window) is resampled to crop x crop on its background; the geometry is, in units of the
  canvas's shorter side: the foreground's centroid (y, x) from the canvas's top-left and its distance
  to the bottom and right walls, the window's side, the canvas's height and width, the centroid's move
  since the previous frame (x MOVE_SCALE; 0 at the first frame), and whether the frame is real.
  Missing frames are all zero."""
  b, f, s = pixels.shape[:3]
  x = pixels.reshape((b * f, s, s, 3)).astype(jnp.float32) / 127.5 - 1.0
  foreground, background, top, left, side, weights = classifier_task.digit_window(x)
  crops = classifier_task.resample_window(foreground, top, left, side, crop) + background[:, None, None, :]
  m = mask.reshape((b * f, s, s)) > 0
  real = m.any(axis=(1, 2))

  def extent(any_along):  # [N, S] -> (first, one past the last) index
    first = jnp.argmax(any_along, axis=1)
    return first.astype(jnp.float32), (s - jnp.argmax(any_along[:, ::-1], axis=1)).astype(jnp.float32)

  canvas_top, canvas_bottom = extent(m.any(axis=2))
  canvas_left, canvas_right = extent(m.any(axis=1))
  height, width = canvas_bottom - canvas_top, canvas_right - canvas_left
  short = jnp.maximum(jnp.minimum(height, width), 1.0)
  total = weights.sum(axis=(1, 2))
  coords = jnp.arange(s, dtype=jnp.float32) + 0.5
  cy = jnp.where(total > 0, (weights.sum(2) * coords).sum(1) / jnp.maximum(total, 1e-6), (canvas_top + canvas_bottom) / 2)
  cx = jnp.where(total > 0, (weights.sum(1) * coords).sum(1) / jnp.maximum(total, 1e-6), (canvas_left + canvas_right) / 2)
  y, xx = (cy - canvas_top) / short, (cx - canvas_left) / short
  geometry = jnp.stack([y, xx, (canvas_bottom - cy) / short, (canvas_right - cx) / short, side / short,
                        height / short, width / short], axis=-1).reshape((b, f, 7))
  real = real.reshape((b, f))
  position = geometry[..., :2]
  both = (real[:, 1:] & real[:, :-1])[..., None]
  move = jnp.concatenate([jnp.zeros((b, 1, 2)), jnp.where(both, position[:, 1:] - position[:, :-1], 0.0)], axis=1)
  geometry = jnp.concatenate([geometry, MOVE_SCALE * move, real[..., None].astype(jnp.float32),
                              jnp.ones((b, f, 1)) * (real.sum(1, keepdims=True)[..., None] > 1)], axis=-1)
  geometry = jnp.where(real[..., None], geometry, 0.0)
  crops = jnp.where(real.reshape((b * f, 1, 1, 1)), crops, 0.0).reshape((b, f, crop, crop, 3))
  return crops, geometry


def make_objective(config):
  del config  # no diffusion objective: loss_fn holds the whole loss
  return None


def vocabulary(config) -> captioner_lib.CaptionVocabulary:
  return captioner_lib.CaptionVocabulary(tuple(config.model.token_ids), int(config.model.max_length))


def _losses(params, model, batch):
  """(per-example caption loss [B], contrastive logits [B, B], positives [B, B], argmax tokens [B, L-1])."""
  text = batch["text"]
  crops, geometry = clip_inputs(batch["pixels"], batch["mask"], model.crop)
  logits, video_embedding, text_embedding, log_inverse_temperature = model.apply(
      {"params": params}, crops, geometry, text[:, :-1])
  targets = text[:, 1:]
  weights = (targets != captioner_lib.PAD).astype(jnp.float32)
  token_losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  caption = (token_losses * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
  scale = jnp.exp(jnp.minimum(log_inverse_temperature, jnp.log(100.0)))  # CLIP's cap on the inverse temperature
  similarity = scale * video_embedding @ text_embedding.T
  positives = jnp.all(text[:, None, :] == text[None, :, :], axis=-1).astype(jnp.float32)
  return caption, similarity, positives, jnp.argmax(logits, -1)


def _contrastive(similarity, positives):
  targets = positives / positives.sum(1, keepdims=True)
  video_to_text = optax.softmax_cross_entropy(similarity, targets)
  text_to_video = optax.softmax_cross_entropy(similarity.T, targets)
  return (video_to_text + text_to_video) / 2


def loss_fn(params, model, objective, batch, rng, config, *, train=True):
  del objective, rng, train  # deterministic network: no dropout, no noise
  caption, similarity, positives, predicted = _losses(params, model, batch)
  contrastive = _contrastive(similarity, positives)
  loss = config.train.caption_weight * caption.mean() + config.train.contrastive_weight * contrastive.mean()
  targets = batch["text"][:, 1:]
  real = targets != captioner_lib.PAD
  token_accuracy = jnp.sum((predicted == targets) & real) / jnp.maximum(real.sum(), 1)
  return loss, {"loss": loss, "caption_loss": caption.mean(), "contrastive_loss": contrastive.mean(),
                "token_accuracy": token_accuracy}


def eval_fn(params, model, objective, batch, index, config) -> dict:
  """Sums over the batch, plus the greedy captions and true captions for summarize_eval to parse."""
  del objective, index
  caption, similarity, positives, _ = _losses(params, model, batch)
  contrastive = _contrastive(similarity, positives)
  video_tokens = model.apply({"params": params}, *clip_inputs(batch["pixels"], batch["mask"], model.crop),
                             method=captioner_lib.Captioner.encode_video)
  generated = captioner_lib.greedy_decode(model, params, video_tokens, int(config.model.max_length))
  hit_v2t = jnp.take_along_axis(positives, jnp.argmax(similarity, 1)[:, None], 1)[:, 0]
  hit_t2v = jnp.take_along_axis(positives, jnp.argmax(similarity, 0)[:, None], 1)[:, 0]
  token_ids = jnp.asarray(config.model.token_ids, jnp.int32)
  return {"caption_loss_sum": caption.sum(), "contrastive_loss_sum": contrastive.sum(),
          "retrieval_v2t": hit_v2t.sum(), "retrieval_t2v": hit_t2v.sum(),
          "count": jnp.asarray(caption.shape[0], jnp.float32),
          "moving": jnp.any(batch["mask"] > 0, axis=(2, 3))[:, min(1, config.model.frames - 1)],  # a 2nd frame
          # as MiniLM ids, so summarize_eval decodes them without the config
          "generated_ids": token_ids[generated], "true_ids": token_ids[batch["text"]]}


def attribute_matches(generated: list[str], true: list[str]) -> dict[str, np.ndarray]:
  """{attribute: bool [N]} whether each generated caption states the true caption's attribute;
  also "parsed" (the generated caption parses) and "all" (every attribute matches)."""
  out = {name: np.zeros(len(true), bool) for name in ATTRIBUTES}
  out["parsed"] = np.zeros(len(true), bool)
  for i, (gen, ref) in enumerate(zip(generated, true)):
    ref_attributes = moving_digits.caption_attributes(ref)
    if ref_attributes is None:
      raise ValueError(f"true caption {ref!r} is not a moving_digits caption: no attributes to compare")
    gen_attributes = moving_digits.caption_attributes(gen)
    if gen_attributes is None:
      continue
    out["parsed"][i] = True
    for name, key in ATTRIBUTES.items():
      out[name][i] = gen_attributes[key] == ref_attributes[key]
  out["all"] = np.all([out[name] for name in ATTRIBUTES], axis=0)
  return out


@functools.lru_cache(maxsize=1)
def _minilm_decoder():
  return captioner_lib._tokenizer(captioner_lib.tokenizer_path())  # pylint: disable=protected-access


def decode_minilm(rows) -> list[str]:
  """Captions of MiniLM id rows ([CLS] ... [SEP] [PAD]...)."""
  tokenizer = _minilm_decoder()
  return tokenizer.decode_batch([[int(t) for t in row] for row in np.asarray(rows)], skip_special_tokens=True)


def summarize_eval(auxes: list[dict]) -> dict:
  count = sum(float(a["count"]) for a in auxes)
  generated = [c for a in auxes for c in decode_minilm(a["generated_ids"])]
  true = [c for a in auxes for c in decode_minilm(a["true_ids"])]
  moving = np.concatenate([np.asarray(a["moving"]) for a in auxes])
  matches = attribute_matches(generated, true)
  scores = {
      "eval/loss": sum(float(a["caption_loss_sum"]) for a in auxes) / max(count, 1.0),
      "eval/contrastive_loss": sum(float(a["contrastive_loss_sum"]) for a in auxes) / max(count, 1.0),
      "eval/retrieval_v2t": sum(float(a["retrieval_v2t"]) for a in auxes) / max(count, 1.0),
      "eval/retrieval_t2v": sum(float(a["retrieval_t2v"]) for a in auxes) / max(count, 1.0),
      "eval/caption_exact": float(np.mean([g == t for g, t in zip(generated, true)])),
      "eval/examples": count,
  }
  for name, hits in matches.items():
    scores[f"eval/match_{name}"] = float(hits.mean())
  for name in MOTION_ATTRIBUTES:
    scores[f"eval/match_{name}_moving"] = float(matches[name][moving].mean()) if moving.any() else float("nan")
  return scores


# --------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class PrepareCaptionedClip(grain.transforms.Map):
  """tfds example -> {"pixels", "mask", "text"} (see the module docstring)."""

  canvas: int
  frames: int
  token_ids: tuple
  max_length: int

  def map(self, element: dict) -> dict:
    video = element["video"] if "video" in element else element["image"]
    pixels, mask = captioner_lib.prepare_clip(np.asarray(video), self.canvas, self.frames)
    caption = element["caption"]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    vocab = captioner_lib.CaptionVocabulary(self.token_ids, self.max_length)
    return {"pixels": pixels, "mask": mask, "text": vocab.encode([caption])[0]}


def make_dataset(config, *, split: str, process_index: int = 0, process_count: int = 1, seed: int = 0,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """This process's fixed-shape batches of one split, shuffled, repeated num_epochs (None: forever)."""
  data, model = config.data, config.model
  global_batch = int(config.train.global_batch)
  if global_batch % process_count:
    raise ValueError(f"train.global_batch={global_batch} is not divisible by process_count={process_count}")
  source = sources.open_source(data.name, split, data.data_dir, **pipeline.builder_kwargs(data))
  ds = grain.MapDataset.source(source)[process_index::process_count].shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(PrepareCaptionedClip(canvas=int(model.canvas), frames=int(model.frames),
                                   token_ids=tuple(int(t) for t in model.token_ids),
                                   max_length=int(model.max_length)))
  return ds.to_iter_dataset(pipeline.read_options(data)).batch(global_batch // process_count, drop_remainder=True)


# --------------------------------------------------------------------------- inference

class LoadedCaptioner:
  """A trained captioner: caption(videos) -> captions, batched and jitted (greedy or beam)."""

  def __init__(self, config, params, step: int):
    if config.get("task") != "captioner":
      raise ValueError(f"that run is a {config.get('task')!r} model, not a captioner (configs/captioner.py)")
    self.config, self.params, self.step = config, params, step
    self.model = build_model(config)
    self.vocabulary = vocabulary(config)
    m = config.model
    self.canvas, self.frames, self.max_length = int(m.canvas), int(m.frames), int(m.max_length)
    self._generate = jax.jit(self._generate_impl, static_argnames=("beams",))

  def _generate_impl(self, params, pixels, mask, *, beams):
    video_tokens = self.model.apply({"params": params}, *clip_inputs(pixels, mask, self.model.crop),
                                    method=captioner_lib.Captioner.encode_video)
    if beams <= 1:
      return captioner_lib.greedy_decode(self.model, params, video_tokens, self.max_length)
    return captioner_lib.beam_decode(self.model, params, video_tokens, self.max_length, beams)

  def caption(self, videos, *, beams: int = 1, batch_size: int = 32) -> list[str]:
    """Captions of uint8 clips [T, H, W, 3] (or images [H, W, 3]) of any sizes; batches are padded to
    batch_size so one compiled program serves every call."""
    out = []
    for start in range(0, len(videos), batch_size):
      chunk = [captioner_lib.prepare_clip(v, self.canvas, self.frames) for v in videos[start:start + batch_size]]
      pixels = np.zeros((batch_size, self.frames, self.canvas, self.canvas, 3), np.uint8)
      mask = np.zeros(pixels.shape[:-1], np.uint8)
      for i, (p, m) in enumerate(chunk):
        pixels[i], mask[i] = p, m
      rows = self._generate(self.params, pixels, mask, beams=int(beams))
      out.extend(self.vocabulary.decode(np.asarray(rows)[:len(chunk)]))
    return out
