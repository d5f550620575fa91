"""Spacetime patches and NaViT-style packing into fixed-length rows (pure numpy).

patchify: a video [T, H, W, C] becomes N = T'H'W' tokens of P = pt*ph*pw*C
values, flattened in (pt, ph, pw, C) order (ViT / DiT's patch order, with time
first), plus each token's (t, h, w) grid position.

Packing (NaViT, Dehghani et al. 2023; first-fit with a bounded set of open
rows) puts whole examples into rows of L tokens, at most K examples a row, and
writes the packed-batch contract of DESIGN.md:

  patches      [L, P] float32  token values, 0 in padding
  segment_ids  [L] int32       0 = padding, k = the k-th example of the row (1..K)
  positions    [L, 3] int32    (t, h, w) inside the token's own example
  cond_mask    [L] bool        conditioning-frame tokens (copied from the example)
  grid         [K, 3] int32    (T', H', W') of example k, 0 where empty
  example_ids  [K] int64       dataset id of example k, -1 where empty
  labels       [K] int32       class label of example k, -1 where empty

An example is never split across rows. A row is emitted as soon as it is full
(L tokens or K examples); when an example fits no open row and all
`num_open_rows` are in use, the fullest open row is emitted to make room.
"""
import base64
import collections
from typing import Any, Iterable, Sequence

import einops
import grain
import numpy as np


# --------------------------------------------------------------------------- patches

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
  """(t, h, w) coordinates [T'H'W', 3] int32 of a patch grid in row-major order."""
  axes = np.meshgrid(*(np.arange(g, dtype=np.int32) for g in grid), indexing="ij")
  return np.stack(axes, axis=-1).reshape(-1, 3)


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


# --------------------------------------------------------------------------- packer

def _normalize_example(example: dict) -> dict:
  """Checks one example and fixes its dtypes (the packer's own copy)."""
  patches = np.asarray(example["patches"], np.float32)
  if patches.ndim != 2 or patches.shape[0] == 0:
    raise ValueError(f"example 'patches' must be [N>0, P], got shape {patches.shape}")
  n = patches.shape[0]
  positions = np.asarray(example["positions"], np.int32)
  if positions.shape != (n, 3):
    raise ValueError(f"example 'positions' must be [{n}, 3], got shape {positions.shape}")
  cond_mask = np.asarray(example.get("cond_mask", np.zeros(n, bool)), bool)
  if cond_mask.shape != (n,):
    raise ValueError(f"example 'cond_mask' must be [{n}], got shape {cond_mask.shape}")
  grid = np.asarray(example.get("grid", positions.max(axis=0) + 1), np.int32)
  if grid.shape != (3,):
    raise ValueError(f"example 'grid' must be (T', H', W'), got shape {grid.shape}")
  return dict(
      patches=patches, positions=positions, cond_mask=cond_mask, grid=grid,
      id=int(example.get("id", -1)), label=int(example.get("label", -1)))


def _encode_array(a: np.ndarray) -> dict:
  """JSON-safe, bit-exact array (Grain's Orbax handler stores states as JSON)."""
  a = np.ascontiguousarray(a)
  return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def _decode_array(d: dict) -> np.ndarray:
  flat = np.frombuffer(base64.b64decode(d["b64"]), dtype=np.dtype(d["dtype"]))
  return flat.reshape(d["shape"]).copy()


_ARRAY_KEYS = ("patches", "positions", "cond_mask", "grid")


def _encode_example(ex: dict) -> dict:
  return {**{k: _encode_array(ex[k]) for k in _ARRAY_KEYS}, "id": ex["id"], "label": ex["label"]}


def _decode_example(d: dict) -> dict:
  return {**{k: _decode_array(d[k]) for k in _ARRAY_KEYS}, "id": int(d["id"]), "label": int(d["label"])}


class FirstFitPacker:
  """Stateful first-fit packer over a bounded set of open rows (see module docstring).

  add() places one example, flush() closes every open row, pop() returns the
  next finished row (or None). Its state (open and finished rows) is JSON-safe.
  """

  def __init__(self, tokens_per_row: int, examples_per_row: int, num_open_rows: int = 4):
    if tokens_per_row < 1 or examples_per_row < 1 or num_open_rows < 1:
      raise ValueError(
          "tokens_per_row, examples_per_row and num_open_rows must be >= 1, got "
          f"{tokens_per_row}, {examples_per_row}, {num_open_rows}")
    self.tokens_per_row = tokens_per_row
    self.examples_per_row = examples_per_row
    self.num_open_rows = num_open_rows
    self._open: list[list[dict]] = []  # rows still accepting examples, in opening order
    self._ready: collections.deque[list[dict]] = collections.deque()  # finished, not yet popped
    self._patch_dim = -1

  def _is_full(self, row: list[dict]) -> bool:
    return len(row) >= self.examples_per_row or _row_tokens(row) >= self.tokens_per_row

  def add(self, example: dict) -> None:
    ex = _normalize_example(example)
    n, p = ex["patches"].shape
    if n > self.tokens_per_row:
      raise ValueError(
          f"example id={ex['id']} has {n} tokens (grid {tuple(ex['grid'])}), more than "
          f"tokens_per_row={self.tokens_per_row}; resize or crop it before packing, or raise "
          "data.tokens_per_row")
    if self._patch_dim == -1:
      self._patch_dim = p
    elif p != self._patch_dim:
      raise ValueError(f"example id={ex['id']} has patch size {p}, earlier examples {self._patch_dim}")
    for i, row in enumerate(self._open):
      if _row_tokens(row) + n <= self.tokens_per_row:  # open rows always have a free slot
        row.append(ex)
        if self._is_full(row):
          self._ready.append(self._open.pop(i))
        return
    if len(self._open) >= self.num_open_rows:
      fullest = max(range(len(self._open)), key=lambda i: _row_tokens(self._open[i]))
      self._ready.append(self._open.pop(fullest))
    row = [ex]
    if self._is_full(row):
      self._ready.append(row)
    else:
      self._open.append(row)

  def flush(self) -> None:
    """Closes every open row (end of data)."""
    self._ready.extend(self._open)
    self._open = []

  def pop(self) -> dict | None:
    """The next finished row as a contract dict, or None when none is finished."""
    if not self._ready:
      return None
    return materialize_row(self._ready.popleft(), self.tokens_per_row, self.examples_per_row,
                           max(self._patch_dim, 0))

  def get_state(self) -> dict[str, Any]:
    return {
        "open": [[_encode_example(ex) for ex in row] for row in self._open],
        "ready": [[_encode_example(ex) for ex in row] for row in self._ready],
        "patch_dim": self._patch_dim,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._open = [[_decode_example(d) for d in row] for row in state["open"]]
    self._ready = collections.deque([_decode_example(d) for d in row] for row in state["ready"])
    self._patch_dim = int(state["patch_dim"])


def _row_tokens(row: list[dict]) -> int:
  return sum(ex["patches"].shape[0] for ex in row)


def materialize_row(examples: list[dict], tokens_per_row: int, examples_per_row: int,
                    patch_dim: int) -> dict[str, np.ndarray]:
  """Writes normalized examples, in order, into one contract row (module docstring)."""
  L, K = tokens_per_row, examples_per_row
  row = dict(
      patches=np.zeros((L, patch_dim), np.float32),
      segment_ids=np.zeros((L,), np.int32),
      positions=np.zeros((L, 3), np.int32),
      cond_mask=np.zeros((L,), bool),
      grid=np.zeros((K, 3), np.int32),
      example_ids=np.full((K,), -1, np.int64),
      labels=np.full((K,), -1, np.int32),
  )
  start = 0
  for k, ex in enumerate(examples):
    end = start + ex["patches"].shape[0]
    row["patches"][start:end] = ex["patches"]
    row["segment_ids"][start:end] = k + 1
    row["positions"][start:end] = ex["positions"]
    row["cond_mask"][start:end] = ex["cond_mask"]
    row["grid"][k] = ex["grid"]
    row["example_ids"][k] = ex["id"]
    row["labels"][k] = ex["label"]
    start = end
  return row


def split_row(row: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  """The examples of one packed row: [{patches, positions, cond_mask, grid, id, label}, ...].

  Inverse of packing (for sampling outputs and audits); segment k is example k-1.
  """
  out = []
  for k in range(row["example_ids"].shape[0]):
    token_mask = row["segment_ids"] == k + 1
    if not token_mask.any():
      continue
    out.append(dict(
        patches=row["patches"][token_mask], positions=row["positions"][token_mask],
        cond_mask=row["cond_mask"][token_mask], grid=row["grid"][k],
        id=int(row["example_ids"][k]), label=int(row["labels"][k])))
  return out


def pack_examples(examples: Iterable[dict], tokens_per_row: int, examples_per_row: int,
                  num_open_rows: int = 4) -> list[dict[str, np.ndarray]]:
  """Packs a finite iterable of examples into rows (no Grain; for tools and tests)."""
  packer = FirstFitPacker(tokens_per_row, examples_per_row, num_open_rows)
  rows = []
  for ex in examples:
    packer.add(ex)
    while (row := packer.pop()) is not None:
      rows.append(row)
  packer.flush()
  while (row := packer.pop()) is not None:
    rows.append(row)
  return rows


def batch_stats(batch: dict[str, np.ndarray]) -> dict[str, float]:
  """tokens, real (non-padding) tokens, packing efficiency, examples of a row or batch."""
  segment_ids = np.asarray(batch["segment_ids"])
  tokens = int(segment_ids.size)
  real = int(np.count_nonzero(segment_ids))
  return dict(tokens=tokens, real_tokens=real, efficiency=real / max(tokens, 1),
              examples=int(np.count_nonzero(np.asarray(batch["example_ids"]) >= 0)))


# --------------------------------------------------------------------------- Grain transformation

class PackIterDataset(grain.IterDataset):
  """Grain transformation: examples (dicts with patches, positions, grid, id, label) -> packed rows.

  Checkpointable: the iterator state holds the parent's state and the packer's
  open and finished rows, so a restored iterator yields exactly the same rows.
  """

  def __init__(self, parent: grain.IterDataset, *, tokens_per_row: int, examples_per_row: int,
               num_open_rows: int = 4):
    super().__init__(parent)
    FirstFitPacker(tokens_per_row, examples_per_row, num_open_rows)  # validates the sizes now
    self._sizes = (tokens_per_row, examples_per_row, num_open_rows)

  def __iter__(self) -> "PackDatasetIterator":
    return PackDatasetIterator(self._parent.__iter__(), FirstFitPacker(*self._sizes))

  def __str__(self) -> str:
    return "PackIterDataset(tokens_per_row=%d, examples_per_row=%d, num_open_rows=%d)" % self._sizes


class PackDatasetIterator(grain.DatasetIterator):
  """Iterator of PackIterDataset; state = {parent, packer, parent_exhausted}."""

  def __init__(self, parent: grain.DatasetIterator, packer: FirstFitPacker):
    super().__init__(parent)
    self._packer = packer
    self._parent_exhausted = False

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      row = self._packer.pop()
      if row is not None:
        return row
      if self._parent_exhausted:
        raise StopIteration
      try:
        self._packer.add(next(self._parent))
      except StopIteration:
        self._parent_exhausted = True
        self._packer.flush()

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "packer": self._packer.get_state(),
            "parent_exhausted": self._parent_exhausted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._packer.set_state(state["packer"])
    self._parent_exhausted = bool(state["parent_exhausted"])

  def __str__(self) -> str:
    return "PackDatasetIterator"


def pack(dataset: grain.IterDataset, *, tokens_per_row: int, examples_per_row: int,
         num_open_rows: int = 4) -> PackIterDataset:
  """dataset of examples -> dataset of packed rows (see PackIterDataset)."""
  return PackIterDataset(dataset, tokens_per_row=tokens_per_row,
                         examples_per_row=examples_per_row, num_open_rows=num_open_rows)
