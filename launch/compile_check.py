"""Compiles the real train step for a TPU slice on this machine, without the TPU: does it fit, how many FLOPs.

  pip install -e '.[tpu]'   # libtpu: the TPU compiler, used here without a TPU
  python launch/compile_check.py --config=configs/dit_image.py:variant=XL/2 --topology=v5p-64 \
      --config.mesh.shape='(1,-1,1)' --config.train.global_batch=256

MaxText's train_compile idea: jax.experimental.topologies describes the slice
(its devices, without hardware), the train step of diffusion_jax.train.loop is
lowered with abstract inputs (ShapeDtypeStructs carrying the shardings) and
compiled by libtpu. Prints the per-device memory of the compiled program
(arguments, outputs, temporaries, the donated part counted once) against the
chip's HBM, and the FLOPs of one step (of the global program, layers unrolled). Exit status 0 = fits, 1 = does not fit,
2 = bad input (an unknown topology lists the valid ones).

--topology is a Cloud TPU accelerator type (v5p-64, v5e-16, v4-8, v6e-8: the
number counts TensorCores for v4/v5p and chips for v5e/v6e) or a raw topology
name 'v5p:2x4x4'. Runs on a CPU-only machine; no TPU is touched.
"""
import argparse
import os
import sys

GIB = 1024 ** 3

# HBM of one chip, GiB.
HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}

# Chip grids of the common slice shapes: 3D torus generations (v4, v5p), 2D (v5e, v6e).
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def accelerator_types() -> dict[str, str]:
  """Accelerator type ('v5p-64') -> topology name ('v5p:2x4x4')."""
  table = {}
  for gen in ("v4", "v5p"):
    for chips, grid in _GRIDS_3D.items():
      table[f"{gen}-{2 * chips}"] = f"{gen}:{grid}"  # two TensorCores per chip
  for gen in ("v5e", "v6e"):
    for chips, grid in _GRIDS_2D.items():
      table[f"{gen}-{chips}"] = f"{gen}:{grid}"
  return table


def topology_name(name: str) -> str:
  """'v5p-64' or 'v5p:2x4x4' -> 'v5p:2x4x4'; ValueError listing the valid names otherwise."""
  table = accelerator_types()
  if name in table:
    return table[name]
  gen, sep, grid = name.partition(":")
  dims = grid.split("x")
  if sep and gen in HBM_GIB and len(dims) in (2, 3) and all(d.isdigit() and int(d) > 0 for d in dims):
    return name
  raise ValueError(f"unknown TPU topology {name!r}; valid: {', '.join(sorted(table, key=_type_order))}, "
                   f"or a raw name GEN:AxBxC with GEN in {sorted(HBM_GIB)}")


def _type_order(name):
  gen, _, count = name.partition("-")
  return gen, int(count)


def chip_count(topology: str) -> int:
  count = 1
  for d in topology.partition(":")[2].split("x"):
    count *= int(d)
  return count


def topology_devices(topology: str):
  """The devices of a TPU slice, described by libtpu without one (RuntimeError when libtpu is missing)."""
  try:
    import libtpu  # noqa: F401  (the TPU compiler ships in this package)
  except ImportError:
    raise RuntimeError("libtpu is not installed: pip install -e '.[tpu]' (or pip install libtpu)") from None
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server off Cloud TPU
  # Compiling touches no TPU, so several checks may run at once (libtpu's lockfile would refuse).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # libtpu rejects the shape with a JaxRuntimeError
    raise ValueError(f"libtpu cannot describe topology {topology!r}: {str(e).splitlines()[0]}") from None


def lower_train_step(config, devices):
  """Lowers loop.make_train_step for `devices` with abstract inputs; returns (lowered, mesh, num_params)."""
  import jax
  import numpy as np

  from diffusion_jax import config as config_lib
  from diffusion_jax import sharding
  from diffusion_jax.train import loop

  loop.validate(config, num_devices=len(devices),
                      process_count=len({d.process_index for d in devices}))
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  model, optimizer, _, abstract_state, state_shardings = loop.build_state(config, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  task = loop.TASKS[config.task]
  one_row = task.dummy_batch(config, 1)  # shapes and dtypes only; the global batch is never allocated
  abstract_batch = {k: jax.ShapeDtypeStruct((int(config.train.global_batch),) + v.shape[1:],
                                            jax.dtypes.canonicalize_dtype(v.dtype), sharding=batch_sharding)
                    for k, v in one_row.items()}
  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_shardings)
  # The loop's own jitted train step.
  step_fn = loop.jit_train_step(config, model, optimizer, mesh, state_shardings)
  with sharding.activate(mesh, rules):
    lowered = step_fn.lower(abstract_state, abstract_batch)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_state.params))
  return lowered, mesh, num_params


def compile_for_topology(lowered):
  """lowered.compile() with JAX's persistent cache off: an executable compiled
  for a described slice has no client to be loaded back from the cache, so
  caching it only writes entries that every later read warns about."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  # JAX decides once per process whether the cache is used: reset that
  # decision around the switch, both ways.
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    return lowered.compile()
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def step_flops(config):
  """FLOPs of one whole train step (all devices), from the HLO of the step with its layers unrolled.

  XLA's cost analysis counts the body of a loop once, so a scanned model
  (model.scan_layers) would show one layer's FLOPs; lowering (no compile) an
  unrolled copy counts them all. The copy is lowered unsharded on one host
  CPU device (the TPU topology's lowering has no cost analysis): the global
  program's FLOPs. None where no count comes back. A Pallas TPU attention
  kernel ('splash') does not lower for the CPU (and a custom call has no cost
  analysis), so the copy counts the same attention through the 'xla' backend.
  """
  import jax

  from diffusion_jax import config as config_lib

  unrolled = config_lib.from_json(config_lib.to_json(config))
  if "scan_layers" in unrolled.model:
    unrolled.model.scan_layers = False
  unrolled.mesh.shape = [1] * len(unrolled.mesh.shape)
  if unrolled.model.get("attention_backend", "xla") == "splash":
    unrolled.model.attention_backend = "xla"
  lowered, _, _ = lower_train_step(unrolled, jax.devices("cpu")[:1])
  analysis = lowered.cost_analysis() or {}
  flops = analysis.get("flops")
  return float(flops) if flops and flops > 0 else None


def memory_report(compiled) -> dict:
  """Per-device bytes of a compiled program; peak = arguments + outputs + temporaries - donated (aliased)."""
  m = compiled.memory_analysis()
  report = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                temporaries=m.temp_size_in_bytes, aliased=m.alias_size_in_bytes,
                code=m.generated_code_size_in_bytes)
  report["peak"] = report["arguments"] + report["outputs"] + report["temporaries"] - report["aliased"] + report["code"]
  return report


def check(config, topology_arg: str, out=sys.stdout) -> dict:
  """Compiles for the slice and prints the table; returns {fits, peak_bytes, hbm_bytes, flops, num_params}."""
  topology = topology_name(topology_arg)
  devices = topology_devices(topology)
  config = _for_accelerator(config)
  gen = topology.partition(":")[0]
  hbm_per_device = HBM_GIB[gen] * GIB * chip_count(topology) / len(devices)
  try:
    lowered, mesh, num_params = lower_train_step(config, devices)
    compiled = compile_for_topology(lowered)
  except Exception as e:  # libtpu refuses a program larger than HBM at compile time
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    print(f"fits  NO: libtpu cannot place the train step in {_gib(hbm_per_device)} per device: "
          f"{str(e).splitlines()[0][:400]}", file=out, flush=True)
    return dict(fits=False, peak_bytes=None, hbm_bytes=hbm_per_device, flops=None, num_params=None)
  mem = memory_report(compiled)
  flops = step_flops(config)
  needed = model_flops(config)
  fits = mem["peak"] <= hbm_per_device
  if flops is None or needed is None:
    ratio = "unknown"
  else:
    ratio = f"{flops / needed:.3f}"

  rows = [
      ("topology", f"{topology_arg} = {topology}: {len(devices)} devices ({devices[0].device_kind}), "
                   f"{len({d.process_index for d in devices})} hosts"),
      ("mesh", str(dict(mesh.shape))),
      ("model", f"{config.model.variant}: {num_params / 1e6:.2f}M params, global batch {config.train.global_batch} x "
                f"{config.data.tokens_per_row} tokens, {config.train.compute_dtype}, remat {config.model.remat}"),
      ("arguments / device", _gib(mem["arguments"])),
      ("outputs / device", _gib(mem["outputs"])),
      ("temporaries / device", _gib(mem["temporaries"])),
      ("donated (aliased)", _gib(mem["aliased"])),
      ("peak / device", f"{_gib(mem['peak'])} of {_gib(hbm_per_device)} HBM ({100 * mem['peak'] / hbm_per_device:.1f}%)"),
      ("FLOPs / step", "unknown" if flops is None else f"{flops:.3e} (all devices, XLA's count, layers unrolled)"),
      ("model FLOPs / step", "unknown" if needed is None else f"{needed:.3e} (the architecture's, "
                                                               "rows of one example of L tokens)"),
      ("compiled / model", ratio),
      ("fits", "yes" if fits else "NO"),
  ]
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}", file=out)
  if not fits:
    print(f"error: the train step needs {_gib(mem['peak'])} per device, more than the {_gib(hbm_per_device)} of "
          f"{topology_arg}; shard more (mesh.shape fsdp), remat (model.remat=full) or lower train.global_batch",
          file=out)
  out.flush()
  return dict(fits=fits, peak_bytes=mem["peak"], hbm_bytes=hbm_per_device, flops=flops, model_flops=needed,
              num_params=num_params)


def _for_accelerator(config):
  """A copy whose model.scan_unroll 0 (auto) is resolved for the accelerator (a
  loop, 1), not for this CPU host, which only traces."""
  from diffusion_jax import config as config_lib

  config = config_lib.from_json(config_lib.to_json(config))
  if config.model.get("scan_unroll", 1) == 0:
    config.model.scan_unroll = 1
  return config


def model_flops(config):
  """The task's analytic model FLOPs for a global batch whose rows hold one
  example of data.tokens_per_row tokens (and its caption fills the text
  budget): the attention work the 'xla' backend does on a row; packed rows of
  several examples need less. None for tasks without a count."""
  import numpy as np

  from diffusion_jax.train import loop

  count = getattr(loop.TASKS[config.task], "model_flops", None)
  if count is None:
    return None
  rows = int(config.train.global_batch)
  batch = dict(segment_ids=np.ones((rows, int(config.data.tokens_per_row)), np.int32))
  if int(config.data.get("text_tokens_per_row", 0)):
    batch["text_segment_ids"] = np.ones((rows, int(config.data.text_tokens_per_row)), np.int32)
  return count(config, batch)


def _gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 1024 ** 2:.1f} MiB"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   epilog="Override any config field with --config.section.field=value.")
  parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  parser.add_argument("--topology", required=True, help="v5p-64, v5e-16, v4-8, v6e-8, ... or v5p:2x4x4")
  args, rest = parser.parse_known_args(argv)
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; libtpu compiles for the described slice

  from diffusion_jax import config as config_lib

  try:
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    return 0 if check(config, args.topology)["fits"] else 1
  except (ValueError, RuntimeError) as e:  # ConfigError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
