"""NaViT-style packing of patchified clips (diffusion_jax.patches) into fixed-length rows (pure numpy).

Packing (NaViT, Dehghani et al. 2023; here streaming best-fit-decreasing, see
BestFitPacker) puts whole examples into rows of L tokens, at most K examples a
row, and writes the packed-batch contract of docs/design.md:

  patches      [L, P] float32  token values, 0 in padding
  segment_ids  [L] int32       0 = padding, k = the k-th example of the row (1..K)
  positions    [L, 3] int32    (t, h, w) inside the token's own example
  cond_mask    [L] bool        conditioning-frame tokens (copied from the example)
  grid         [K, 3] int32    (T', H', W') of example k, 0 where empty
  example_ids  [K] int64       dataset id of example k, -1 where empty
  labels       [K] int32       class label of example k, -1 where empty
  text         [Lt, Dt] float32 the examples' caption tokens (text-encoder outputs), packed
  text_segment_ids [Lt] int32  which example each text token belongs to, 0 = padding
                               (both only when the packer has text_tokens_per_row > 0)
  captions     [K] str         caption of example k, "" where empty      (host only)
  skipped      [R] int32       examples skipped since the previous row,  (host only)
                               per reason of SKIP_REASONS

An example is never split across rows. The host-only keys (HOST_KEYS) never
go to the device: pipeline.make_global_batch leaves them out.
"""
import base64
import collections
import zlib
from typing import Any, Iterable

import grain
import numpy as np


# --------------------------------------------------------------------------- packer

# Why an example was skipped instead of packed; rows count them in `skipped`.
SKIP_REASONS = ("no_frames", "bad_channels", "bad_shape", "non_finite", "too_big", "wrong_size")
# Row keys that stay on the host (text, counters); make_global_batch leaves them out.
HOST_KEYS = ("captions", "skipped")


def check_packed_batch(batch: dict) -> None:
  """ValueError naming the first inconsistency of a packed batch's bookkeeping: a segment id
  outside [0, K] (K = examples_per_row, the width of `labels`/`example_ids`), a caption token
  of an example slot past K, or a conditioning token on padding. The model would read such a
  row silently wrong (gathers clamp out-of-range indices)."""
  if "segment_ids" not in batch:
    return
  segment_ids = np.asarray(batch["segment_ids"])
  k = np.asarray(batch["example_ids"]).shape[-1] if "example_ids" in batch else np.asarray(batch["labels"]).shape[-1]
  for name in ("segment_ids", "text_segment_ids"):
    if name in batch:
      ids = np.asarray(batch[name])
      bad = (ids < 0) | (ids > k)
      if bad.any():
        row, pos = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"packed batch: {name}[{row}, {pos}] = {int(ids[row, pos])} is outside [0, K={k}] "
                         "(0 = padding, k = example k of the row)")
  if "cond_mask" in batch:
    bad = np.asarray(batch["cond_mask"], bool) & (segment_ids == 0)
    if bad.any():
      row, pos = (int(i[0]) for i in np.nonzero(bad))
      raise ValueError(f"packed batch: cond_mask[{row}, {pos}] marks a padding token (segment id 0) as "
                       "conditioning context")


def skip_record(reason: str) -> dict:
  """What a decode step yields instead of an example it cannot use: counted, never packed."""
  if reason not in SKIP_REASONS:
    raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
  return {"skipped": reason}


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
  caption = example.get("caption", "")
  if isinstance(caption, bytes):
    caption = caption.decode()
  text = np.asarray(example.get("text", np.zeros((0, 0), np.float32)), np.float32)
  if text.ndim != 2:
    raise ValueError(f"example 'text' must be [n_text, Dt], got shape {text.shape}")
  return _with_counts(dict(
      patches=patches, positions=positions, cond_mask=cond_mask, grid=grid, text=text,
      id=int(example.get("id", -1)), label=int(example.get("label", -1)), caption=str(caption)))


def _with_counts(ex: dict) -> dict:
  """The example with its token and caption-token counts as ints (best fit reads them for every
  waiting example at every placement; they are derived, so states do not store them)."""
  ex["tokens"], ex["text_tokens"] = ex["patches"].shape[0], ex["text"].shape[0]
  return ex


def _encode_array(a: np.ndarray) -> dict:
  """JSON-safe, bit-exact array (Grain's Orbax handler stores states as JSON).

  zlib first: the buffered clips' flat backgrounds shrink the state several-fold.
  """
  a = np.ascontiguousarray(a)
  return {"dtype": a.dtype.str, "shape": list(a.shape),
          "zlib_b64": base64.b64encode(zlib.compress(a.tobytes(), 1)).decode()}


def _decode_array(d: dict) -> np.ndarray:
  raw = zlib.decompress(base64.b64decode(d["zlib_b64"])) if "zlib_b64" in d else base64.b64decode(d["b64"])
  return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


_ARRAY_KEYS = ("patches", "positions", "cond_mask", "grid", "text")
_SCALAR_KEYS = ("id", "label", "caption")


def _encode_example(ex: dict) -> dict:
  return {**{k: _encode_array(ex[k]) for k in _ARRAY_KEYS}, **{k: ex[k] for k in _SCALAR_KEYS}}


def _decode_example(d: dict) -> dict:
  arrays = {k: _decode_array(d[k]) for k in _ARRAY_KEYS if k in d}
  arrays.setdefault("text", np.zeros((0, 0), np.float32))  # states written before text existed
  return _with_counts({**arrays, "id": int(d["id"]), "label": int(d["label"]), "caption": str(d["caption"])})


class _Row(list):
  """A row's examples, with their token and caption-token totals kept as examples join (best fit
  asks every open row for them at every placement)."""

  def __init__(self, examples=()):
    super().__init__()
    self.tokens = self.text_tokens = 0
    for ex in examples:
      self.add(ex)

  def add(self, ex: dict) -> None:
    self.append(ex)
    self.tokens += ex["tokens"]
    self.text_tokens += ex["text_tokens"]


class BestFitPacker:
  """Best-fit packing over `num_open_rows` open rows, fed largest-first from a buffer.

  The classic offline heuristic is best-fit decreasing; this is its bounded,
  streaming form. Examples wait in a buffer of `buffer_size`; when it
  overflows, the largest waiting example (earliest on ties) goes to the open
  row it fills most tightly (best fit). When it fits no open row, a new row
  opens, and if `num_open_rows` are already open the fullest one is closed
  first. A row closes when it holds L tokens or K examples, or when closed to
  make room; before it is emitted its leftover space is topped up with the
  largest waiting examples that fit, which is what the small examples in the
  buffer are for. flush() (end of data) places every waiting example and
  closes all rows.

  Every choice is a deterministic function of the input order, and the whole
  state (buffer, open and finished rows, skip counts) is JSON-safe, so a
  restored packer emits exactly the same rows. Skip records (skip_record())
  are counted, not packed; the counts ride on the next emitted row.
  """

  def __init__(self, tokens_per_row: int, examples_per_row: int, num_open_rows: int = 8,
               buffer_size: int = 32, text_tokens_per_row: int = 0):
    if text_tokens_per_row < 0:
      raise ValueError(f"text_tokens_per_row must be >= 0, got {text_tokens_per_row}")
    self.text_tokens_per_row = text_tokens_per_row  # Lt; 0 = rows carry no text
    self._text_dim = -1
    if tokens_per_row < 1 or examples_per_row < 1 or num_open_rows < 1 or buffer_size < 0:
      raise ValueError(
          "tokens_per_row, examples_per_row and num_open_rows must be >= 1 and buffer_size >= 0, got "
          f"{tokens_per_row}, {examples_per_row}, {num_open_rows}, {buffer_size}")
    self.tokens_per_row = tokens_per_row
    self.examples_per_row = examples_per_row
    self.num_open_rows = num_open_rows
    self.buffer_size = buffer_size
    self._pending: list[dict] = []  # the buffer, in arrival order
    self._open: list[_Row] = []  # rows still accepting examples, in opening order
    self._ready: collections.deque[_Row] = collections.deque()  # finished, not yet popped
    self._skipped = np.zeros(len(SKIP_REASONS), np.int32)  # not yet reported on a row
    self._patch_dim = -1

  def _is_full(self, row: _Row) -> bool:
    return len(row) >= self.examples_per_row or row.tokens >= self.tokens_per_row

  def add(self, example: dict) -> None:
    if "skipped" in example:
      self._skipped[SKIP_REASONS.index(example["skipped"])] += 1
      return
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
    if self.text_tokens_per_row:
      n_text, text_dim = ex["text"].shape
      if n_text > self.text_tokens_per_row:
        raise ValueError(f"example id={ex['id']} has {n_text} caption tokens, more than "
                         f"text_tokens_per_row={self.text_tokens_per_row}")
      if n_text and self._text_dim not in (-1, text_dim):
        raise ValueError(f"example id={ex['id']} has text width {text_dim}, earlier examples {self._text_dim}")
      if n_text:
        self._text_dim = text_dim
    self._pending.append(ex)
    if len(self._pending) > self.buffer_size:
      self._place(self._take_largest(self.tokens_per_row))

  def _text_fits(self, ex: dict, row: _Row) -> bool:
    return not self.text_tokens_per_row or ex["text_tokens"] + row.text_tokens <= self.text_tokens_per_row

  def _take_largest(self, at_most: int, row: _Row | None = None) -> dict | None:
    """Removes and returns the largest waiting example of <= at_most tokens whose
    caption also fits `row`'s text budget (earliest on ties)."""
    text_room = self.text_tokens_per_row - (row.text_tokens if row is not None else 0)
    best, best_tokens = None, 0
    for i, ex in enumerate(self._pending):
      n = ex["tokens"]
      if best_tokens < n <= at_most and (not self.text_tokens_per_row or ex["text_tokens"] <= text_room):
        best, best_tokens = i, n
    return None if best is None else self._pending.pop(best)

  def _place(self, ex: dict) -> None:
    n = ex["tokens"]
    best, best_free = None, None
    for i, row in enumerate(self._open):  # open rows always have a free example slot
      free = self.tokens_per_row - row.tokens
      if n <= free and self._text_fits(ex, row) and (best is None or free < best_free):
        best, best_free = i, free
    if best is None:
      if len(self._open) >= self.num_open_rows:
        self._close(max(range(len(self._open)), key=lambda i: (self._open[i].tokens, -i)))
      self._open.append(_Row())
      best = len(self._open) - 1
    self._open[best].add(ex)
    if self._is_full(self._open[best]):
      self._close(best)

  def _close(self, index: int) -> None:
    row = self._open.pop(index)
    while len(row) < self.examples_per_row:
      filler = self._take_largest(self.tokens_per_row - row.tokens, row)
      if filler is None:
        break
      row.add(filler)
    self._ready.append(row)

  def flush(self) -> None:
    """Places every waiting example and closes every open row (end of data)."""
    while self._pending:
      self._place(self._take_largest(self.tokens_per_row))
    while self._open:
      self._close(0)

  def pop(self) -> dict | None:
    """The next finished row as a contract dict, or None when none is finished."""
    if not self._ready:
      return None
    row = materialize_row(self._ready.popleft(), self.tokens_per_row, self.examples_per_row,
                          max(self._patch_dim, 0), self.text_tokens_per_row, max(self._text_dim, 0))
    row["skipped"] = self._skipped
    self._skipped = np.zeros(len(SKIP_REASONS), np.int32)
    return row

  def get_state(self) -> dict[str, Any]:
    return {
        "pending": [_encode_example(ex) for ex in self._pending],
        "open": [[_encode_example(ex) for ex in row] for row in self._open],
        "ready": [[_encode_example(ex) for ex in row] for row in self._ready],
        "skipped": [int(c) for c in self._skipped],
        "patch_dim": self._patch_dim,
        "text_dim": self._text_dim,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._pending = [_decode_example(d) for d in state["pending"]]
    self._open = [_Row(_decode_example(d) for d in row) for row in state["open"]]
    self._ready = collections.deque(_Row(_decode_example(d) for d in row) for row in state["ready"])
    self._skipped = np.asarray(state["skipped"], np.int32)
    self._patch_dim = int(state["patch_dim"])
    self._text_dim = int(state.get("text_dim", -1))


def materialize_row(examples: list[dict], tokens_per_row: int, examples_per_row: int,
                    patch_dim: int, text_tokens_per_row: int = 0, text_dim: int = 0) -> dict[str, np.ndarray]:
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
      captions=np.array([ex["caption"] for ex in examples] + [""] * (K - len(examples)), dtype=str),
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
  if text_tokens_per_row:
    row["text"] = np.zeros((text_tokens_per_row, text_dim), np.float32)
    row["text_segment_ids"] = np.zeros((text_tokens_per_row,), np.int32)
    start = 0
    for k, ex in enumerate(examples):
      end = start + ex["text"].shape[0]
      row["text"][start:end] = ex["text"]
      row["text_segment_ids"][start:end] = k + 1
      start = end
  return row


def split_row(row: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  """The examples of one packed row: [{patches, positions, cond_mask, grid, id, label, caption}, ...].

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
        id=int(row["example_ids"][k]), label=int(row["labels"][k]),
        caption=str(row["captions"][k]) if "captions" in row else "",
        **({"text": row["text"][row["text_segment_ids"] == k + 1]} if "text" in row else {})))
  return out


def pack_examples(examples: Iterable[dict], tokens_per_row: int, examples_per_row: int,
                  num_open_rows: int = 8, buffer_size: int = 32,
                  text_tokens_per_row: int = 0) -> list[dict[str, np.ndarray]]:
  """Packs a finite iterable of examples into rows (no Grain; for tools and tests)."""
  packer = BestFitPacker(tokens_per_row, examples_per_row, num_open_rows, buffer_size, text_tokens_per_row)
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
  """Grain transformation: examples (dicts with patches, positions, grid, id, label, caption)
  or skip records -> packed rows (BestFitPacker).

  Checkpointable: the iterator state holds the parent's state and the packer's
  buffer, open and finished rows, so a restored iterator yields exactly the same rows.
  """

  def __init__(self, parent: grain.IterDataset, *, tokens_per_row: int, examples_per_row: int,
               num_open_rows: int = 8, buffer_size: int = 32, text_tokens_per_row: int = 0):
    super().__init__(parent)
    self._sizes = (tokens_per_row, examples_per_row, num_open_rows, buffer_size, text_tokens_per_row)
    BestFitPacker(*self._sizes)  # validates now

  def __iter__(self) -> "PackDatasetIterator":
    return PackDatasetIterator(self._parent.__iter__(), BestFitPacker(*self._sizes))

  def __str__(self) -> str:
    return ("PackIterDataset(tokens_per_row=%d, examples_per_row=%d, num_open_rows=%d, "
            "buffer_size=%d, text_tokens_per_row=%d)" % self._sizes)


class PackDatasetIterator(grain.DatasetIterator):
  """Iterator of PackIterDataset; state = {parent, packer, parent_exhausted}."""

  def __init__(self, parent: grain.DatasetIterator, packer: BestFitPacker):
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
         num_open_rows: int = 8, buffer_size: int = 32, text_tokens_per_row: int = 0) -> PackIterDataset:
  """dataset of examples -> dataset of packed rows (see PackIterDataset)."""
  return PackIterDataset(dataset, tokens_per_row=tokens_per_row, examples_per_row=examples_per_row,
                         num_open_rows=num_open_rows, buffer_size=buffer_size,
                         text_tokens_per_row=text_tokens_per_row)
