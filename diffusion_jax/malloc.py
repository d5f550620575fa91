"""Which malloc a `python -m diffusion_jax` command runs on.

XLA's CPU runtime mallocs each step's scratch buffer (159 MB for
benchmarks/vs_reference.py's tiny DiT). glibc serves blocks that big from a
fresh mmap and unmaps them on free, so every step page-faulted its scratch back
in: 41k faults and ~100 ms of kernel time a step on this project's 2-core host.
tcmalloc keeps freed blocks for reuse; the same step ran 20-25% faster with it
(BENCHMARKS.md, "Page faults"). A malloc is chosen when the process starts, so
the command re-runs itself with LD_PRELOAD. Hosts with a TPU or GPU are left as
they are (libtpu brings its own allocator). No JAX here: this runs before it is
imported.
"""
import glob
import os
import sys

TCMALLOC_LIBRARIES = tuple(f"/usr/{lib}/{name}" for lib in ("lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu", "lib64")
                           for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"))
CHOICES = ("auto", "tcmalloc", "system")


def has_accelerator(environ) -> bool:
  """JAX_PLATFORMS names a platform other than the CPU first, or TPU / NVIDIA device files exist."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0] != "cpu"
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.path.exists("/dev/nvidia0"))


def tcmalloc_environment(environ, libraries=TCMALLOC_LIBRARIES):
  """The environment to re-run the command in with tcmalloc preloaded, or None to run it as it is.

  DIFFUSION_JAX_ALLOCATOR: 'auto' (default: tcmalloc on a CPU-only Linux host that has it),
  'tcmalloc' (required: an error without it) or 'system' (leave malloc alone).
  """
  choice = environ.get("DIFFUSION_JAX_ALLOCATOR", "auto")
  if choice not in CHOICES:
    raise ValueError(f"DIFFUSION_JAX_ALLOCATOR={choice!r}: use one of {', '.join(CHOICES)}")
  preloaded = environ.get("LD_PRELOAD", "")
  if choice == "system" or "tcmalloc" in preloaded or not sys.platform.startswith("linux"):
    return None
  if choice == "auto" and has_accelerator(environ):
    return None
  library = next((path for path in libraries if os.path.exists(path)), None)
  if library is None:
    if choice == "tcmalloc":
      raise FileNotFoundError(f"DIFFUSION_JAX_ALLOCATOR=tcmalloc, but none of {', '.join(libraries)} exists "
                              "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
    return None
  # gperftools reports every allocation over 1 GiB on stderr; a pod-sized batch is no news.
  return {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40), **environ,
          "LD_PRELOAD": ":".join(filter(None, (library, preloaded)))}


def rerun_on_tcmalloc_if_wanted() -> None:
  """Replaces this process by the same command on tcmalloc when tcmalloc_environment says so."""
  try:
    environ = tcmalloc_environment(os.environ)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if environ is not None:
    os.execve(sys.executable, [sys.executable, "-m", "diffusion_jax", *sys.argv[1:]], environ)
