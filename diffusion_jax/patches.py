"""Spacetime patches: the one token layout that data (pipeline, packing) and models (U-Net) share.

patchify: a video [T, H, W, C] becomes N = T'H'W' tokens of P = pt*ph*pw*C
values, flattened in (pt, ph, pw, C) order (ViT / DiT's patch order, with time
first), plus each token's (t, h, w) grid position. Works on numpy and jax arrays.
"""
import functools
from typing import Sequence

import einops
import numpy as np


def _check_patch(video_shape: Sequence[int], patch: Sequence[int]):
  if len(video_shape) != 4:
    raise ValueError(f"expected a video [T, H, W, C], got shape {tuple(video_shape)}")
  if len(patch) != 3 or min(patch) < 1:
    raise ValueError(f"patch must be three positive sizes (pt, ph, pw), got {tuple(patch)}")
  for axis, size, p in zip("THW", video_shape[:3], patch):
    if size % p:
      raise ValueError(
          f"patch {tuple(patch)} does not divide video shape {tuple(video_shape)}: "
          f"{axis}={size} is not a multiple of {p}")


def patchify(video, patch: Sequence[int]):
  """Video [T, H, W, C] -> (tokens [N, pt*ph*pw*C], positions [N, 3] int32, grid (T', H', W')).

  Tokens run over the grid in (t, h, w) row-major order; each token flattens
  its patch in (pt, ph, pw, C) order. Works on numpy and jax arrays.
  """
  _check_patch(video.shape, patch)
  pt, ph, pw = (int(p) for p in patch)
  grid = (video.shape[0] // pt, video.shape[1] // ph, video.shape[2] // pw)
  tokens = einops.rearrange(
      video, "(t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
  return tokens, grid_positions(grid), grid


def grid_positions(grid: Sequence[int]) -> np.ndarray:
  """(t, h, w) coordinates [T'H'W', 3] int32 of a patch grid in row-major order (read-only, shared)."""
  return _grid_positions(tuple(int(g) for g in grid))


@functools.lru_cache(maxsize=4096)
def _grid_positions(grid: tuple[int, int, int]) -> np.ndarray:
  # Every example of the data pipeline asks; a dataset has few distinct grids, and building one
  # (meshgrid + stack) was a quarter of the quickstart's host time per batch.
  axes = np.meshgrid(*(np.arange(g, dtype=np.int32) for g in grid), indexing="ij")
  positions = np.stack(axes, axis=-1).reshape(-1, 3)
  positions.setflags(write=False)
  return positions


def unpatchify(tokens, grid: Sequence[int], patch: Sequence[int], channels: int):
  """Inverse of patchify: tokens [T'H'W', pt*ph*pw*C] -> video [T'pt, H'ph, W'pw, C]."""
  pt, ph, pw = (int(p) for p in patch)
  t, h, w = (int(g) for g in grid)
  if tokens.ndim != 2 or tokens.shape[0] != t * h * w or tokens.shape[1] != pt * ph * pw * channels:
    raise ValueError(
        f"tokens of shape {tuple(tokens.shape)} do not match grid {(t, h, w)} with patch "
        f"{(pt, ph, pw)} and {channels} channels: expected {(t * h * w, pt * ph * pw * channels)}")
  return einops.rearrange(
      tokens, "(t h w) (pt ph pw c) -> (t pt) (h ph) (w pw) c",
      t=t, h=h, w=w, pt=pt, ph=ph, pw=pw, c=channels)
