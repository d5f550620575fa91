"""Where training numbers go: TensorBoard, a JSONL log, and a console progress line.

Only process 0 writes; other processes get a writer that does nothing, so the
loop never asks which process it is.

Also the FLOPs side: `dit_train_flops` counts the model FLOPs of a DiT train
step analytically from the batch's real segment lengths (what the
architecture needs, PaLM's "model FLOPs"), `step_flops` reads the FLOPs of a
compiled step from XLA's cost analysis (what the program does: padding,
rematerialisation, and for an `nn.scan`-ned model the scanned body counted
once, so it is a check, not a measure), `device_peak_flops` gives a device's
peak (a table for accelerators, a measured matmul on CPU), and `mfu` puts
model FLOPs, time and peak together.
"""
import json
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter  # pure Python, no TensorFlow
from tensorboardX.proto.summary_pb2 import Summary

from diffusion_jax import media

from diffusion_jax import paths

# Dense bf16 peak FLOP/s per chip (vendor figures), matched against
# jax.Device.device_kind in order: the first key found in the lowercase kind wins.
PEAK_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("tpu v5", 459e12),
    ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12),
)
_measured_cpu_peak = {}


class MetricWriter:
  def __init__(self, workdir: str, total_steps: int, *, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self._tb = None
    self._jsonl = None
    self._remote_log = None
    self._tb_dir = None  # a bucket workdir's events: written here, copied up at each flush
    if enabled:
      paths.makedirs(workdir)
      self._tb_target = paths.join(workdir, "tensorboard")
      self._jsonl_path = paths.join(workdir, "metrics.jsonl")
      if paths.is_remote(workdir):
        # Not tensorboardX's own gs:// writer: it uploads its whole buffer again when it is garbage
        # collected, and where the bucket is gone by then (a test's emulator) retries for minutes.
        self._tb_dir = tempfile.mkdtemp(prefix="diffusion_jax_tensorboard_")
        self._last_upload = time.time()
        # An object store has no append: keep the log, upload it whole per write.
        self._remote_log = paths.read_text(self._jsonl_path) if paths.exists(self._jsonl_path) else ""
      else:
        self._jsonl = open(self._jsonl_path, "a")
      self._tb = SummaryWriter(self._tb_dir or self._tb_target)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    line = json.dumps({"step": step, "time": time.time(), **scalars}) + "\n"
    if self._remote_log is not None:
      self._remote_log += line
      paths.replace_text(self._jsonl_path, self._remote_log)
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb_dir and time.time() - self._last_upload > 60:
      self._flush_tensorboard()

  def _flush_tensorboard(self) -> None:
    self._tb.flush()
    self._upload_tensorboard()

  def _upload_tensorboard(self) -> None:
    if self._tb_dir:
      paths.copytree(self._tb_dir, self._tb_target)
      self._last_upload = time.time()

  def write_media(self, step: int, pictures: dict, *, fps: int = 8) -> None:
    """uint8 [T, H, W, C] per tag into TensorBoard's images tab: one frame as a PNG, a clip as an
    animated GIF (an image summary holding GIF bytes, which TensorBoard plays; tensorboardX's own
    add_video needs moviepy)."""
    if not self.enabled:
      return
    for tag, video in pictures.items():
      video = np.asarray(video)
      if len(video) == 1:
        self._tb.add_image(tag, video[0], step, dataformats="HWC")
        continue
      _, height, width, channels = video.shape
      image = Summary.Image(height=height, width=width, colorspace=channels,
                            encoded_image_string=media.encode_gif(video, fps=fps))
      self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    self._flush_tensorboard()

  def progress(self, step: int, scalars: dict, *, eta_s=None) -> None:
    """One console line: a bar, the step, the scalars given, and the time left."""
    if not self.enabled:
      return
    width = 24
    done = int(width * step / max(self.total_steps, 1))
    bar = "#" * done + "." * (width - done)
    parts = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
    eta = f" eta={format_duration(eta_s)}" if eta_s is not None else ""
    print(f"[{bar}] {step}/{self.total_steps} {parts}{eta}", file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._upload_tensorboard()
      if self._tb_dir:
        shutil.rmtree(self._tb_dir, ignore_errors=True)
      if self._jsonl is not None:
        self._jsonl.close()


def _fmt(value) -> str:
  value = float(value)
  if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
    return f"{value:.3e}"
  return f"{value:.4g}"


def format_duration(seconds: float) -> str:
  """1h02m, 4m05s or 12s."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def step_flops(compiled, num_devices: int):
  """FLOPs of one step of a compiled (jit(...).lower(...).compile()) SPMD program, all devices together.

  XLA's cost analysis describes the per-device partitioned program, so its
  count is multiplied by the number of devices. None where the backend gives
  no count.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  if not flops or flops <= 0:
    return None
  return float(flops) * num_devices


def dit_forward_flops(*, width: int, depth: int, patch_dim: int, out_dim: int, segment_lengths,
                      mlp_ratio: float = 4.0, text_dim: int = 0, text_lengths=None, clocks=None,
                      adaln: str = "zero", frequency_dim: int = 256, pooled_text: bool = False) -> float:
  """FLOPs (2 per multiply-add) of one DiT forward pass over packed rows, as the architecture needs them.

  segment_lengths: per row, the token count of each example (padding left
  out: the model needs no work for it). Per token: the patch embedding, per
  block the q/k/v/out projections and the MLP (+ the cross-attention's q and
  out projections with text), the final linear. Self-attention:
  4 len^2 width per example and block (QK^T and AV); cross-attention:
  4 len len_text width. Text tokens (text_lengths, aligned with
  segment_lengths; default none): the caption MLP and each block's k/v
  projections. Per (example, clock) (`clocks`, default one per example):
  the timestep MLP and the adaLN modulations (adaln='zero': 6 width^2 a block
  + 2 width^2 final; 'single': one shared 6 width^2), as DiT computes them
  once per image. Norms, softmax and elementwise work are not counted (PaLM's
  convention).
  """
  d = width
  lengths = [np.asarray(row, np.float64) for row in segment_lengths]
  tokens = sum(float(r.sum()) for r in lengths)
  examples = sum(len(r) for r in lengths)
  clocks = examples if clocks is None else clocks
  per_token = patch_dim * d + depth * (4 * d * d + 2 * mlp_ratio * d * d) + d * out_dim
  flops = 2.0 * tokens * per_token
  flops += 4.0 * depth * d * sum(float(np.square(r).sum()) for r in lengths)
  if text_dim:
    text = [np.asarray(row, np.float64) for row in (text_lengths or [[0] * len(r) for r in lengths])]
    text_tokens = sum(float(r.sum()) for r in text)
    flops += 2.0 * tokens * depth * 2 * d * d  # cross-attention q and out projections
    flops += 2.0 * text_tokens * (text_dim * d + d * d + depth * 2 * d * d)  # caption MLP, k and v
    flops += 4.0 * depth * d * sum(float((r * t).sum()) for r, t in zip(lengths, text))
    if pooled_text:
      flops += 2.0 * examples * (text_dim * d + d * d)
  modulation = depth * 6 * d * d + 2 * d * d if adaln == "zero" else 6 * d * d
  flops += 2.0 * clocks * (frequency_dim * d + d * d + modulation)
  return flops


def dit_train_flops(**kwargs) -> float:
  """Model FLOPs of one DiT train step: 3 x the forward (the backward costs two forwards)."""
  return 3.0 * dit_forward_flops(**kwargs)


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 3) -> float:
  """FLOP/s of the host's CPU on a size x size float32 matmul (best of `repeats`), measured once per process.

  1024 is already past the size where XLA's CPU matmul reaches its plateau,
  and keeps the measurement near a tenth of a second on 2 cores.
  """
  if size not in _measured_cpu_peak:
    device = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, a).block_until_ready()
      best = min(best, time.perf_counter() - start)
    _measured_cpu_peak[size] = 2.0 * size ** 3 / best
  return _measured_cpu_peak[size]


def device_peak_flops(device):
  """Peak FLOP/s of one device: the PEAK_FLOPS table, or on CPU a measured matmul.

  The fake CPU devices of one host share its cores, so each gets the host's
  measured peak divided by the number of local CPU devices. None for an
  accelerator not in the table.
  """
  if device.platform == "cpu":
    return measure_cpu_peak_flops() / len(jax.local_devices(backend="cpu"))
  kind = device.device_kind.lower()
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak
  return None


def mfu(flops_per_step, steps_per_s: float, num_devices: int, peak_per_device):
  """Achieved FLOP/s over the devices' peak; None where either count is unknown."""
  if not flops_per_step or not peak_per_device:
    return None
  return flops_per_step * steps_per_s / (num_devices * peak_per_device)


def for_process(workdir: str, total_steps: int) -> MetricWriter:
  return MetricWriter(workdir, total_steps, enabled=jax.process_index() == 0)


# --------------------------------------------------------------------------- image quality

def psnr(x, y, *, data_range: float = 2.0):
  """Peak signal-to-noise ratio in dB over the last three axes [..., H, W, C]: 10 log10(R^2 / MSE).

  data_range R is max - min of the value range (2 for [-1, 1], 255 for
  uint8). Identical images give inf. Works on numpy or jax arrays, in jit.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  mse = jnp.mean(jnp.square(x - y), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float):
  offsets = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  w = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  return w / w.sum()


def ssim(x, y, *, data_range: float = 2.0, window: int = 11, sigma: float = 1.5):
  """Structural similarity (Wang et al. 2004) over the last three axes [..., H, W, C], mean over
  pixels and channels.

  The paper's settings, as skimage.metrics.structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=R, channel_axis=-1): an 11x11 Gaussian window (sigma 1.5),
  K1 = 0.01, K2 = 0.03, statistics over the valid window positions only. The
  window shrinks to the largest odd size <= min(H, W) for smaller images.
  Identical images give 1.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  height, width = x.shape[-3:-1]
  size = min(window, height, width)
  size -= 1 - size % 2
  w = _gaussian_window(size, sigma)

  def blur(a):  # separable valid Gaussian filtering of [..., H, W, C], channels apart
    lead, (h, w_, c) = a.shape[:-3], a.shape[-3:]
    a = jnp.moveaxis(a.reshape((-1, h, w_, c)), -1, 1).reshape((-1, h, w_, 1))
    for kernel in (w.reshape(size, 1, 1, 1), w.reshape(1, size, 1, 1)):
      a = jax.lax.conv_general_dilated(a, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    a = jnp.moveaxis(a.reshape((-1, c) + a.shape[1:3]), 1, -1)
    return a.reshape(lead + a.shape[1:])

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x * mu_x
  var_y = blur(y * y) - mu_y * mu_y
  cov = blur(x * y) - mu_x * mu_y
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=(-3, -2, -1))
