"""Attention backends side by side: forward and forward+backward time and compiled temporary memory.

  python benchmarks/attention.py                      # the backends that run on this platform
  python benchmarks/attention.py --sizes=4x1024x8x64 --backends=xla,gpu --repeats=5

Each size BxLxHxD is a packed self-attention batch (4 examples of uneven
length and trailing padding a row) plus a cross-attention case (the same
queries against 64 text tokens a row). For every backend of
layers.ATTENTION_BACKENDS that runs here ('splash' needs a TPU; the
'splash_interpret' Pallas interpreter is a correctness tool, minutes long,
and only runs when named) the jitted forward and the jitted gradient of
sum(out) are compiled once, warmed up and timed over `repeats` calls; the
temporaries come from XLA's memory analysis of the gradient program. The
maximum absolute difference to 'xla' shows that each row compares the same
computation. Prints a markdown table.
"""
import argparse
import time

DEFAULT_SIZES = ("4x256x4x64", "2x1024x4x64")
TEXT_TOKENS = 64


def packed_segment_ids(rows, length, examples=4):
  """[rows, length] int32: `examples` runs of uneven length, then padding (about 1/8 of the row)."""
  import numpy as np

  real = length - length // 8
  cuts = np.linspace(0, real, examples + 1).astype(int)
  cuts[1:-1] += np.arange(1, examples) * (real // (4 * examples))  # uneven lengths
  ids = np.zeros((rows, length), np.int32)
  for k in range(examples):
    ids[:, cuts[k]:cuts[k + 1]] = k + 1
  return ids


def text_segment_ids(rows, examples=4):
  import numpy as np

  ids = np.zeros((rows, TEXT_TOKENS), np.int32)
  per = TEXT_TOKENS // (examples + 1)
  for k in range(examples):
    ids[:, k * per:(k + 1) * per] = k + 1
  return ids


def time_call(fn, args, repeats):
  import jax

  jax.block_until_ready(fn(*args))  # warm-up
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def measure(backend, q, k, v, q_ids, kv_ids, repeats, reference):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffusion_jax.models import layers

  def attend(q, k, v):
    return layers.dot_product_attention(q, k, v, q_ids, kv_ids, backend=backend)

  forward = jax.jit(attend).lower(q, k, v).compile()
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
  grad = grad.lower(q, k, v).compile()
  memory = grad.memory_analysis()
  out = forward(q, k, v)
  error = 0.0 if reference is None else float(np.max(np.abs(np.asarray(out, np.float32) - reference)))
  return dict(forward_ms=1e3 * time_call(forward, (q, k, v), repeats),
              train_ms=1e3 * time_call(grad, (q, k, v), repeats),
              temp_mib=memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan"),
              max_abs_diff=error, out=np.asarray(out, np.float32))


def runnable_backends():
  import jax

  from diffusion_jax.models import layers

  return tuple(b for b in layers.ATTENTION_BACKENDS
               if b != "splash_interpret" and (b != "splash" or jax.default_backend() == "tpu"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated BxLxHxD")
  parser.add_argument("--backends", default="", help="comma-separated; default: those that run here")
  parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (cuDNN wants bfloat16)")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  from diffusion_jax.models import layers

  backends = tuple(args.backends.split(",")) if args.backends else runnable_backends()
  for b in backends:
    if b not in layers.ATTENTION_BACKENDS:
      parser.error(f"unknown backend {b!r}; valid: {', '.join(layers.ATTENTION_BACKENDS)}")
  if backends[0] != "xla":
    backends = ("xla",) + tuple(b for b in backends if b != "xla")  # the reference comes first
  dtype = jnp.dtype(args.dtype)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {dtype.name}, "
        f"gpu implementation: {layers.gpu_implementation()}")
  print("| shape B x Lq x Lk x H x D | backend | forward ms | fwd+bwd ms | bwd temporaries MiB | max abs diff to xla |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for size in args.sizes.split(","):
    try:
      rows, length, heads, depth = (int(x) for x in size.split("x"))
    except ValueError:
      parser.error(f"--sizes wants BxLxHxD entries, got {size!r}")
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (rows, length, heads, depth), dtype)
    q_ids = jnp.asarray(packed_segment_ids(rows, length))
    cases = [("self", length, jax.random.normal(keys[1], q.shape, dtype), jax.random.normal(keys[2], q.shape, dtype),
              q_ids)]
    text_shape = (rows, TEXT_TOKENS, heads, depth)
    cases.append(("cross", TEXT_TOKENS, jax.random.normal(keys[3], text_shape, dtype),
                  jax.random.normal(keys[4], text_shape, dtype), jnp.asarray(text_segment_ids(rows))))
    for kind, kv_len, k, v, kv_ids in cases:
      reference = None
      for backend in backends:
        result = measure(backend, q, k, v, q_ids, kv_ids if kind == "cross" else q_ids, args.repeats, reference)
        if backend == "xla":
          reference = result["out"]
        print(f"| {rows} x {length} x {kv_len} x {heads} x {depth} ({kind}) | {backend} | "
              f"{result['forward_ms']:.1f} | {result['train_ms']:.1f} | {result['temp_mib']:.1f} | "
              f"{result['max_abs_diff']:.1e} |", flush=True)


if __name__ == "__main__":
  main()
