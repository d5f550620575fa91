"""Where training numbers go: TensorBoard, a JSONL log, and a console progress line.

Only process 0 writes; other processes get a writer that does nothing, so the
loop never asks which process it is.
"""
import json
import os
import sys
import time

import jax


class MetricWriter:
  def __init__(self, workdir: str, total_steps: int, *, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pure Python, no TensorFlow

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()

  def progress(self, step: int, scalars: dict) -> None:
    """One console line: a bar, the step, and the scalars given."""
    if not self.enabled:
      return
    width = 24
    done = int(width * step / max(self.total_steps, 1))
    bar = "#" * done + "." * (width - done)
    parts = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
    print(f"[{bar}] {step}/{self.total_steps} {parts}", file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _fmt(value) -> str:
  value = float(value)
  if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
    return f"{value:.3e}"
  return f"{value:.4g}"


def for_process(workdir: str, total_steps: int) -> MetricWriter:
  return MetricWriter(workdir, total_steps, enabled=jax.process_index() == 0)
