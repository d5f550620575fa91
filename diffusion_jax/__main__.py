"""python -m diffusion_jax <command>: quickstart, train, sample, data-stats.

  python -m diffusion_jax quickstart
  python -m diffusion_jax train --config=configs/dit_image.py:variant=S/2 --workdir=/tmp/run --config.train.steps=100
  python -m diffusion_jax sample --workdir=/tmp/run --sampler=ddim --steps=50 --cfg-scale=4

Mistakes in what the user gave (a config, an override, a workdir, a dataset)
print one `error:` line and exit 2; --debug shows the traceback instead.
"""
import argparse
import json
import os
import sys
import time

# Configs ship beside the package in a source checkout (pip install -e .).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_CONFIG = os.path.join(REPO_ROOT, "configs", "dit_image.py") + ":quickstart"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="diffusion_jax", description=__doc__.split("\n")[0])
  parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="train (or resume) a run in --workdir",
                         epilog="Override any config field with --config.section.field=value.")
  train.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  train.add_argument("--workdir", required=True)

  sample = sub.add_parser("sample", help="sample class grids from a run's newest checkpoint (EMA params)")
  _add_sample_args(sample)
  sample.add_argument("--workdir", required=True)
  sample.add_argument("--out", default="", help="output folder (default WORKDIR/samples)")

  stats = sub.add_parser("data-stats", help="print JSON statistics of a config's input pipeline",
                         epilog="Override any config field with --config.section.field=value.")
  stats.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  stats.add_argument("--num-batches", type=int, default=20)
  stats.add_argument("--split", default=None, help="default: the config's data.split")

  quick = sub.add_parser("quickstart", help="build the digits data, train a small DiT, sample a grid per digit")
  quick.add_argument("--workdir", default="quickstart_out")
  quick.add_argument("--steps", type=int, default=0, help="train steps (default: the config's)")
  _add_sample_args(quick)
  return parser


def _add_sample_args(p):
  p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
  p.add_argument("--steps-sample", dest="sample_steps", type=int, default=0, help="sampling steps (ddim)")
  p.add_argument("--cfg-scale", type=float, default=None)
  p.add_argument("--per-class", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)


def _load(spec: str, overrides):
  from diffusion_jax import config as config_lib

  config = config_lib.load_config(spec)
  config_lib.apply_overrides(config, overrides)
  return config


def run_train(config, workdir: str):
  """Trains in this process; with DIFFUSION_JAX_COORDINATOR etc. set, as one of several (see distributed.py)."""
  from diffusion_jax import distributed
  from diffusion_jax.data import pipeline, sources
  from diffusion_jax.train import loop

  distributed.initialize()  # before any device is touched; a no-op for a single process
  distributed.check_agreement(config)  # every process runs the same config and code, or none starts
  # Several processes on one host share the data directory: process 0 builds it first.
  distributed.process_zero_first(sources.ensure_dataset, config.data.name, config.data.data_dir,
                                 **pipeline.builder_kwargs(config.data))
  return loop.train(config, workdir)


def run_sample(workdir: str, out: str, *, sampler: str, steps: int, cfg_scale, per_class: int, seed: int) -> str:
  """Samples per_class images of every class from the newest checkpoint's EMA params."""
  import jax
  import numpy as np

  from diffusion_jax import checkpoint, sharding
  from diffusion_jax.train import dit_task, loop

  manager = checkpoint.make_manager(workdir, keep=1, create=False)
  config = checkpoint.saved_config(manager)
  if config is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}")
  step = manager.latest_step()
  config.mesh.shape = (-1, 1, 1)  # sampling: rows over all local devices
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  model, _, _, abstract_state, state_shardings = loop.build_state(config, mesh, rules)
  state = checkpoint.restore(manager, step, checkpoint.abstract_with_shardings(abstract_state, state_shardings))
  manager.close()

  steps = steps or config.sample.steps
  cfg_scale = config.sample.cfg_scale if cfg_scale is None else cfg_scale
  per_class = per_class or config.sample.per_class
  classes = list(range(config.model.num_classes))
  labels = np.repeat(classes, per_class)
  start = time.time()
  with sharding.activate(mesh, rules):
    images = dit_task.sample(model, state.ema_params, config, labels, jax.random.PRNGKey(seed),
                             sampler=sampler, steps=steps, eta=config.sample.eta, cfg_scale=cfg_scale)
  seconds = time.time() - start

  out = out or os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  images = images.reshape(len(classes), per_class, *images.shape[1:])
  records = []
  for c in classes:
    path = os.path.join(out, f"class_{c}.png")
    _save_grid(images[c:c + 1], path)
    records.append(dict(cls=c, file=os.path.basename(path), count=per_class, seed=seed, sampler=sampler,
                        steps=steps if sampler == "ddim" else config.diffusion.num_steps, cfg=cfg_scale,
                        checkpoint_step=step))
  grid_path = os.path.join(out, "grid.png")
  _save_grid(images, grid_path)
  with open(os.path.join(out, "samples.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  print(f"sampled {len(labels)} images in {seconds:.1f}s -> {grid_path} (one row per class)", flush=True)
  return grid_path


def _save_grid(images, path: str, pad: int = 2) -> None:
  """Writes [rows, cols, H, W, C] uint8 as one PNG with a dark gutter."""
  import numpy as np
  from PIL import Image

  rows, cols, h, w, c = images.shape
  canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 40, np.uint8)
  for i in range(rows):
    for j in range(cols):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      canvas[y:y + h, x:x + w] = images[i, j]
  scale = max(1, 256 // max(canvas.shape[:2]))  # small images are shown larger
  Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas).resize(
      (canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown or (overrides and args.command not in ("train", "quickstart", "data-stats")):
    parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")

  from diffusion_jax import checkpoint, config as config_lib, distributed
  from diffusion_jax.train import loop

  user_errors = (config_lib.ConfigError, checkpoint.CheckpointMismatch, distributed.CoordinatorUnreachable,
                 loop.TrainingDiverged, FileNotFoundError, ValueError)
  try:
    if args.command == "train":
      run_train(_load(args.config, overrides), args.workdir)
    elif args.command == "sample":
      run_sample(args.workdir, args.out, sampler=args.sampler, steps=args.sample_steps,
                 cfg_scale=args.cfg_scale, per_class=args.per_class, seed=args.seed)
    elif args.command == "data-stats":
      from diffusion_jax.data import stats

      result = stats.data_stats(_load(args.config, overrides), num_batches=args.num_batches, split=args.split)
      print(json.dumps(result, indent=1))
    elif args.command == "quickstart":
      start = time.time()
      if args.steps:
        overrides.append(f"train.steps={args.steps}")
      config = _load(QUICKSTART_CONFIG, overrides)
      state, _ = run_train(config, args.workdir)
      if int(state.step) < config.train.steps:  # preempted: the checkpoint is saved, sampling waits
        print(f"stopped at step {int(state.step)}; run the same command again to finish", flush=True)
        return 0
      grid = run_sample(args.workdir, "", sampler=args.sampler, steps=args.sample_steps,
                        cfg_scale=args.cfg_scale, per_class=args.per_class, seed=args.seed)
      print(f"quickstart done in {time.time() - start:.0f}s: checkpoints, TensorBoard logs and metrics.jsonl "
            f"in {args.workdir}/, samples in {grid}", flush=True)
  except user_errors as e:
    if args.debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
