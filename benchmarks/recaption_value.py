"""Does re-captioning pay? The quickstart's video DiT trained on short captions and on the
captioner's dense re-captions of the same clips, the same steps, both asked the same dense prompts.

  python benchmarks/recaption_value.py --quickstart=quickstart_out --captioner=/tmp/captioner --out=/tmp/recap

DALL-E 3 (and Sora after it) retrain on captions written by a captioner trained for the purpose:
dense where the originals were short. Here: the quickstart's clips built again with alt-text
captions ("a 3": moving_digits `captions="short"`, the same clips), re-captioned by the captioner
(`recaption`), each encoded with the quickstart's VAE, and one DiT trained on each
(configs/video_dit.py:quickstart, --steps). Both are then evaluated on the held-out captions of
the quickstart's own latents (the generator's dense captions, `evaluate --eval-data`), with its
classifier: what share of clips show the prompted digit, colours and motion.

Needs a finished `python -m diffusion_jax quickstart` workdir (data, VAE, latents, classifier
export) and a trained captioner (configs/captioner.py). Every stage is skipped when its output
is complete, so a rerun resumes. Prints one table row per caption set; OUT/results.json keeps
the metrics.
"""
import argparse
import json
import os

from diffusion_jax import encode, evaluate, export, inference, quickstart, recaption
from diffusion_jax.data import encoded, sources
from diffusion_jax.train import loop

CHECKS = ("digit", "digit_colour", "background", "direction", "speed", "count")


def _encode(source: str, data_dir: str, builder_kwargs: dict, vae: str, out: str) -> str:
  for split in ("train", "validation"):  # as the quickstart's encode stage
    encode.encode_dataset(source, split, data_dir, out, vae_path=vae, builder_kwargs=builder_kwargs,
                          crop_multiple=8, batch_size=1, pad_frames=max(quickstart.QUICKSTART_DATA["durations"]))
  return out


def _train_and_evaluate(name: str, latents: str, args, channels: int) -> dict:
  config = quickstart._config("video_dit.py", f"quickstart,data={latents},channels={channels}")
  config.train.update(steps=args.steps, ckpt_every=args.steps, eval_every=args.steps)
  encoded.record_conditioners(config)
  workdir = os.path.join(args.out, f"dit_{name}")
  loop.train(config, workdir)
  exported = quickstart._fresh_export(export, workdir, os.path.join(args.out, f"export_{name}"))
  return evaluate.evaluate(exported, os.path.join(args.out, f"eval_{name}"), num_samples=args.num_samples,
                           classifier=os.path.join(args.quickstart, "classifier_export"),
                           eval_data=os.path.join(args.quickstart, "latents"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quickstart", required=True, help="a finished quickstart workdir")
  parser.add_argument("--captioner", required=True, help="a captioner workdir or export")
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=1800, help="DiT steps of each run (the quickstart's)")
  parser.add_argument("--num-samples", type=int, default=40)
  parser.add_argument("--beams", type=int, default=1)
  args = parser.parse_args()
  args.quickstart = os.path.abspath(args.quickstart)
  data_dir, vae = os.path.join(args.quickstart, "data"), os.path.join(args.quickstart, "vae")
  channels = inference.load_vae(vae).latent_channels

  short = dict(quickstart.QUICKSTART_DATA, captions="short")
  sources.ensure_dataset("moving_digits", data_dir, **short)
  recaptioned = os.path.join(args.out, "recaptioned")
  captioner = inference.load_captioner(args.captioner)
  for split in ("train", "validation"):
    recaption.recaption_dataset("moving_digits", split, data_dir, recaptioned, captioner=captioner,
                                beams=args.beams, builder_kwargs=short, batch_size=64)
  runs = {
      "short": _encode("moving_digits", data_dir, short, vae, os.path.join(args.out, "latents_short")),
      "recaptioned": _encode(recaptioned, "", {}, vae, os.path.join(args.out, "latents_recaptioned")),
  }
  results = {name: _train_and_evaluate(name, latents, args, channels) for name, latents in runs.items()}
  own = os.path.join(args.quickstart, "eval", "metrics.json")
  if os.path.isfile(own):  # the quickstart's DiT: the generator's own dense captions, its own steps
    with open(own) as f:
      results["generator's dense (the quickstart's DiT)"] = json.load(f)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  print("| captions | " + " | ".join(CHECKS) + " |")
  print("|---" * (len(CHECKS) + 1) + "|")
  for name, scores in results.items():
    print(f"| {name} (step {scores['step']}) | " + " | ".join(f"{scores.get(f'check/{c}/generated', float('nan')):.3f}" for c in CHECKS)
          + " |")


if __name__ == "__main__":
  main()
