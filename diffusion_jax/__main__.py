"""python -m diffusion_jax <command>: quickstart, train, encode, recaption, sample, export, evaluate, data-stats.

  python -m diffusion_jax quickstart
  python -m diffusion_jax train --config=configs/dit_image.py:variant=S/2 --workdir=/tmp/run --config.train.steps=100
  python -m diffusion_jax sample --workdir=/tmp/run --sampler=ddim --steps-sample=50 --cfg-scale=4
  python -m diffusion_jax encode --source=moving_digits --vae=/tmp/vae --out=/tmp/latents
  python -m diffusion_jax recaption --captioner=/tmp/captioner --source=/data/my_videos_dataset --out=/tmp/recaptioned
  python -m diffusion_jax sample --workdir=/tmp/vdit --prompt="a red 3 moving quickly to the right" --size=32,32 --frames=9

Mistakes in what the user gave (a config, an override, a workdir, a dataset)
print one `error:` line and exit 2; --debug shows the traceback instead.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

from diffusion_jax import malloc

if __name__ == "__main__":  # before the big imports below: the command may re-run itself on tcmalloc
  malloc.rerun_on_tcmalloc_if_wanted()

import jax  # noqa: E402 (after the re-run above)

from diffusion_jax import checkpoint, distributed, encode, evaluate, export as export_lib, inference, quickstart
from diffusion_jax import paths, recaption
from diffusion_jax import config as config_lib
from diffusion_jax import sample as sample_lib
from diffusion_jax.data import encoded, pipeline, sources, stats
from diffusion_jax.train import dit_task, loop

try:  # JAX's own TPU / GPU presence checks (private; a JAX without them probes as usual)
  from jax._src import hardware_utils
except ImportError:
  hardware_utils = None


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="diffusion_jax", description=__doc__.split("\n")[0])
  parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="train (or resume) a run in --workdir",
                         epilog="Override any config field with --config.section.field=value.")
  train.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  train.add_argument("--workdir", required=True)
  train.add_argument("--allow-change", default="",
                     help="resume although these config fields changed, comma-separated (e.g. train.lr,data.name)")

  sample = sub.add_parser("sample", help="sample from a run's newest checkpoint (EMA params): class grids for "
                                         "a class-conditional pixel model, videos (or images) from prompts for "
                                         "text or latent models (diffusion_jax/sample.py)")
  _add_sample_args(sample)
  sample.add_argument("--workdir", required=True)
  sample.add_argument("--out", default="", help="output folder (default WORKDIR/samples)")
  sample.add_argument("--prompt", action="append", default=[], help="prompts: a prompt (repeatable)")
  sample.add_argument("--prompts", default="", help="prompts: a JSON-lines file of requests")
  sample.add_argument("--size", default="", help="prompts: HEIGHT,WIDTH in pixels (default: the config's)")
  sample.add_argument("--frames", type=int, default=0, help="prompts: frames (default: the config's)")
  sample.add_argument("--mode", default="t2v", choices=("t2v", "i2v", "extend", "extend-backward", "interpolate",
                                                         "join", "sdedit", "long"))
  sample.add_argument("--input", default="", help="prompts: the image or video the mode conditions on (join: clip A)")
  sample.add_argument("--input-b", default="", help="join: clip B, whose first frames end the video")
  sample.add_argument("--strength", type=float, default=0.7, help="sdedit: noise level to start from, (0, 1]")
  sample.add_argument("--negative-prompt", default="", help="text for CFG's unconditional branch (text models)")
  sample.add_argument("--keep", type=int, default=0,
                      help="extend, extend-backward, join: input frames kept (default: all; join: 1 of each clip)")
  sample.add_argument("--overlap", type=int, default=0, help="long: latent frames windows share (default: half)")
  sample.add_argument("--window", type=int, default=0, help="long: frames per window (default: the config's)")
  sample.add_argument("--expand", action="store_true",
                      help="expand each prompt to the dense moving_digits caption style (moving_digits.expand_caption)")

  encode = sub.add_parser("encode", help="write a dataset of VAE latents (or pixels) and caption embeddings")
  encode.add_argument("--source", required=True, help="built-in dataset name or a tfds dataset directory")
  encode.add_argument("--builder", default="{}", help="built-in builder arguments as JSON, e.g. '{\"min_side\": 16}'")
  encode.add_argument("--data-dir", default="", help="where built-in datasets live (default ~/.cache/diffusion_jax/data)")
  encode.add_argument("--splits", default="train,validation")
  encode.add_argument("--vae", default="", help="a VAE training workdir; empty = keep pixels")
  encode.add_argument("--text-encoder", default="", help="text-encoder directory (default: the installed wheel's)")
  encode.add_argument("--text-max-length", type=int, default=32)
  encode.add_argument("--crop-multiple", type=int, default=0,
                      help="crop sides to multiples of this (and the VAE factor): fewer shapes to compile")
  encode.add_argument("--out", required=True)

  recaption = sub.add_parser("recaption", help="write a dataset with a trained captioner's captions (the "
                                                "originals kept as original_caption)")
  recaption.add_argument("--captioner", required=True, help="a captioner's workdir or export (configs/captioner.py)")
  recaption.add_argument("--source", required=True, help="built-in dataset name or a tfds dataset directory")
  recaption.add_argument("--builder", default="{}", help="built-in builder arguments as JSON")
  recaption.add_argument("--data-dir", default="", help="where built-in datasets live (default ~/.cache/diffusion_jax/data)")
  recaption.add_argument("--splits", default="train,validation")
  recaption.add_argument("--beams", type=int, default=1, help="1 = greedy decoding, else beam search width")
  recaption.add_argument("--batch-size", type=int, default=32)
  recaption.add_argument("--out", required=True)

  stats = sub.add_parser("data-stats", help="print JSON statistics of a config's input pipeline",
                         epilog="Override any config field with --config.section.field=value.")
  stats.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  stats.add_argument("--num-batches", type=int, default=20)
  stats.add_argument("--split", default=None, help="default: the config's data.split")

  export = sub.add_parser("export", help="write an evaluation artifact (EMA params, config, bundled VAE)")
  export.add_argument("--workdir", required=True)
  export.add_argument("--out", required=True)
  export.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
  export.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  export.add_argument("--safetensors", action="store_true", help="also params.safetensors (flat '/'-joined keys)")

  evaluate = sub.add_parser("evaluate", help="sample from an export and write metrics.json, grids and GIFs")
  evaluate.add_argument("--export", required=True)
  evaluate.add_argument("--out", required=True)
  evaluate.add_argument("--num-samples", type=int, default=64)
  evaluate.add_argument("--seed", type=int, default=0)
  evaluate.add_argument("--classifier", default="", help="a classifier export (configs/classifier_digits.py)")
  evaluate.add_argument("--data-dir", default="", help="where the eval split lives (default: the export's)")
  evaluate.add_argument("--baseline", default="", choices=("frames",),
                        help="frames: also sample every clip frame by frame with the same model (the naive "
                             "baseline) and compare temporal consistency (text-to-video models)")
  evaluate.add_argument("--eval-data", default="",
                        help="prompt models: take captions and clips from this dataset's eval split instead of "
                             "the export's (a latent dataset encoded with the same VAE, e.g. other captions)")

  quick = sub.add_parser("quickstart", help="text-to-video on the built-in data: VAE, encode, video DiT, "
                                            "classifier, export, evaluate, report (diffusion_jax/quickstart.py)")
  quick.add_argument("--workdir", default="quickstart_out")
  quick.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's training steps")
  quick.add_argument("--num-samples", type=int, default=quickstart.NUM_SAMPLES,
                     help="videos generated for the evaluation")
  return parser


def _add_sample_args(p):
  p.add_argument("--sampler", default="", choices=("", "ddim", "ddpm", "euler", "heun"),
                 help="default: the config's sample.sampler")
  p.add_argument("--steps-sample", dest="sample_steps", type=int, default=0, help="sampling steps (not ddpm)")
  p.add_argument("--cfg-scale", type=float, default=None)
  p.add_argument("--per-class", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)


def _skip_tpu_probe_without_tpu() -> None:
  """With libtpu installed (the dev extra brings it for the TPU compile check) on a host without
  TPU chips, JAX's TPU probe prints libtpu errors; pin such hosts to CPU/GPU before any device use.
  JAX_PLATFORMS, when set, wins. Uses the same chip check as JAX's own cloud_tpu_init."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or hardware_utils is None:
    return
  try:
    no_tpu = hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0
    gpu = hardware_utils.has_visible_nvidia_gpu()
  except AttributeError:  # a JAX without these helpers: let it probe
    return
  if no_tpu and not gpu:
    jax.config.update("jax_platforms", "cpu")


def _load(spec: str, overrides):
  config = config_lib.load_config(spec)
  config_lib.apply_overrides(config, overrides)
  return config


def run_train(config, workdir: str, allow_changes=()):
  """Trains in this process; with DIFFUSION_JAX_COORDINATOR etc. set, as one of several (see distributed.py)."""
  distributed.initialize()  # before any device is touched; a no-op for a single process
  encoded.record_conditioners(config)
  distributed.check_agreement(config)  # every process runs the same config and code, or none starts
  # Several processes on one host share the data directory: process 0 builds it first.
  distributed.process_zero_first(sources.ensure_dataset, config.data.name, config.data.data_dir,
                                 **pipeline.builder_kwargs(config.data))
  return loop.train(config, workdir, allow_changes, media_sampler=sample_lib.media_sampler)


def _prepare_source(args) -> dict:
  """encode's and recaption's start: --builder parsed, processes started, the source dataset built
  (process 0 first); returns the builder arguments."""
  try:
    builder = json.loads(args.builder)
  except json.JSONDecodeError as e:
    raise ValueError(f"--builder is not JSON: {e}") from e
  distributed.initialize()
  distributed.process_zero_first(sources.ensure_dataset, args.source, args.data_dir, **builder)
  return builder


def run_encode(args) -> str:
  builder = _prepare_source(args)
  for split in [s for s in args.splits.split(",") if s]:
    start = time.time()
    encode.encode_dataset(args.source, split, args.data_dir, args.out, vae_path=args.vae,
                          text_encoder_dir=args.text_encoder, text_max_length=args.text_max_length,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          builder_kwargs=builder, crop_multiple=args.crop_multiple)
    print(f"encoded {args.source}/{split} in {time.time() - start:.0f}s -> {args.out}", flush=True)
  return args.out


def run_recaption(args) -> str:
  builder = _prepare_source(args)
  captioner = inference.load_captioner(args.captioner)
  for split in [s for s in args.splits.split(",") if s]:
    start = time.time()
    recaption.recaption_dataset(args.source, split, args.data_dir, args.out, captioner=captioner, beams=args.beams,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                builder_kwargs=builder, batch_size=args.batch_size)
    print(f"recaptioned {args.source}/{split} in {time.time() - start:.0f}s -> {args.out}", flush=True)
  return args.out


def run_sample(args) -> str:
  """Class grids of a class-conditional pixel image model, else videos (or images) from prompts."""
  gen = inference.load_generator(args.workdir)
  out = args.out or paths.join(args.workdir, "samples")
  if not dit_task.samples_from_prompts(gen.config):
    return sample_lib.run_class_grid(gen, out, sampler=args.sampler, steps=args.sample_steps,
                                     cfg_scale=args.cfg_scale, per_class=args.per_class, seed=args.seed)
  cfg = gen.config.sample
  size = tuple(int(x) for x in args.size.split(",")) if args.size else tuple(cfg.size)
  if len(size) != 2:
    raise ValueError(f"--size={args.size!r}: use HEIGHT,WIDTH")
  prompts = args.prompt or ([] if args.prompts else list(cfg.prompts))
  requests = sample_lib.parse_requests(prompts, args.prompts, dict(
      size=size, frames=args.frames or cfg.frames, mode=args.mode, input=args.input, strength=args.strength,
      input_b=args.input_b, negative=args.negative_prompt, keep=args.keep, overlap=args.overlap, window=args.window,
      expand=args.expand))
  return sample_lib.run(gen, requests, out, sampler=args.sampler, steps=args.sample_steps, cfg_scale=args.cfg_scale,
                        seed=args.seed)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown or (overrides and args.command not in ("train", "data-stats")):
    parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")

  _skip_tpu_probe_without_tpu()

  user_errors = (config_lib.ConfigError, checkpoint.CheckpointMismatch, distributed.CoordinatorUnreachable,
                 loop.TrainingDiverged, FileNotFoundError, ValueError)
  try:
    if args.command == "train":
      run_train(_load(args.config, overrides), args.workdir, [f for f in args.allow_change.split(",") if f])
    elif args.command == "sample":
      run_sample(args)
    elif args.command == "encode":
      run_encode(args)
    elif args.command == "recaption":
      run_recaption(args)
    elif args.command == "data-stats":
      result = stats.data_stats(_load(args.config, overrides), num_batches=args.num_batches, split=args.split)
      print(json.dumps(result, indent=1))
    elif args.command == "export":
      path = export_lib.export(args.workdir, args.out, step=args.step, dtype=args.dtype, safetensors=args.safetensors)
      print(f"exported {args.workdir} -> {path}", flush=True)
    elif args.command == "evaluate":
      scores = evaluate.evaluate(args.export, args.out, num_samples=args.num_samples, seed=args.seed,
                                 classifier=args.classifier, data_dir=args.data_dir, baseline=args.baseline,
                                 eval_data=args.eval_data)
      print(json.dumps({k: v for k, v in scores.items() if not isinstance(v, list)}, indent=1), flush=True)
      if args.baseline:
        print("\n".join(evaluate.temporal_table(scores)), flush=True)
    elif args.command == "quickstart":
      quickstart.run(args.workdir, scale=args.scale, num_samples=args.num_samples)
  except user_errors as e:
    if args.debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
