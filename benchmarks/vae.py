"""VAE encode/decode throughput and the decoder's peak memory against clip duration.

  JAX_PLATFORMS=cpu python benchmarks/vae.py --variant=small
  python benchmarks/vae.py --variant=video16 --sizes=17x64x64,33x128x128 --durations=9,17,33,65

Throughput: frames per second of the jitted encode and decode at each size
(batch --batch, random weights, after a warm-up call; best of --repeats).
Train step: one jitted fwd+bwd of the VAE loss's core (L1 + KL, Adam excluded)
at --train_size with the causal convolutions as one 3D convolution and as
the time-folded 2D convolution (models/vae.py, CONV_IMPL), in the same run.
Memory: XLA's compiled memory analysis (temp + output bytes) of a full
decode of T frames, against one chunked-decode step (--chunk latent frames
with its causal caches): the chunked step does not grow with T.
"""
import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import vae


def _best_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def _bytes(compiled) -> int:
  analysis = compiled.memory_analysis()
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="small", choices=sorted(vae.VARIANTS))
  parser.add_argument("--sizes", default="9x32x32,17x32x32,9x64x64", help="TxHxW,... for throughput")
  parser.add_argument("--durations", default="9,17,33,65", help="frames, for decode memory")
  parser.add_argument("--memory_size", type=int, default=64, help="frame side for decode memory")
  parser.add_argument("--chunk", type=int, default=1, help="latent frames per chunked-decode step")
  parser.add_argument("--train_size", default="4x5x32x32", help="BxTxHxW of the train-step comparison ('' = skip)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  model = vae.build_vae({"variant": args.variant})
  f, ft = model.spatial_factor, model.temporal_factor
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, f, f, 3))))["params"]
  encode = jax.jit(lambda p, v: model.apply({"params": p}, v, method=vae.VideoVAE.encode)[0])
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae.VideoVAE.decode))
  print(f"device: {jax.devices()[0].device_kind}, variant {args.variant}, batch {args.batch}")
  print("| T x H x W | encode frames/s | decode frames/s |")
  print("| --- | --- | --- |")
  for size in args.sizes.split(","):
    t, h, w = (int(x) for x in size.split("x"))
    video = jax.random.uniform(jax.random.PRNGKey(1), (args.batch, t, h, w, 3), minval=-1, maxval=1)
    z = encode(params, video)
    frames = args.batch * t
    print(f"| {size} | {frames / _best_time(encode, params, video, repeats=args.repeats):.1f} | "
          f"{frames / _best_time(decode, params, z, repeats=args.repeats):.1f} |", flush=True)

  if args.train_size:
    b, t, h, w = (int(x) for x in args.train_size.split("x"))
    video = jax.random.uniform(jax.random.PRNGKey(2), (b, t, h, w, 3), minval=-1, maxval=1)

    def loss(p, v):
      mean, logvar = model.apply({"params": p}, v, method=vae.VideoVAE.encode)
      recon = model.apply({"params": p}, mean, method=vae.VideoVAE.decode)
      return jnp.mean(jnp.abs(recon - v)) + 1e-4 * jnp.mean(vae.kl_to_standard_normal(mean, logvar))

    print(f"\ntrain step (fwd+bwd) at {args.train_size}:")
    print("| causal conv as | ms/step |")
    print("| --- | --- |")
    for impl in ("3d", "folded"):
      vae.CONV_IMPL = impl  # read at trace time: a fresh jit per implementation
      step = jax.jit(jax.grad(loss))
      print(f"| {impl} | {1000 * _best_time(step, params, video, repeats=args.repeats):.1f} |", flush=True)
    vae.CONV_IMPL = "auto"

  side = args.memory_size // f
  first, later = vae._chunk_decoders(model)  # pylint: disable=protected-access
  print(f"\ndecode memory at {args.memory_size}x{args.memory_size}, chunk {args.chunk} latent frame(s): "
        "temp + output bytes of the compiled program")
  print("| frames | full decode MiB | chunked step MiB |")
  print("| --- | --- | --- |")
  for frames in (int(x) for x in args.durations.split(",")):
    latents = 1 + (frames - 1) // ft
    z = jax.ShapeDtypeStruct((args.batch, latents, side, side, model.latent_channels), jnp.float32)
    full = _bytes(decode.lower(params, z).compile())
    chunk = jax.ShapeDtypeStruct((args.batch, args.chunk, side, side, model.latent_channels), jnp.float32)
    first_step = first.lower(params, chunk).compile()
    cache = jax.eval_shape(first, params, chunk)[1]
    later_step = later.lower(params, cache, chunk).compile()
    chunked = max(_bytes(first_step), _bytes(later_step))
    print(f"| {frames} | {full / 2**20:.1f} | {chunked / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
  main()
