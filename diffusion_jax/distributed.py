"""Multi-host start-up: join the JAX distributed system, then check that every process runs the same thing.

Every process of a run calls, before anything touches a device:

  distributed.initialize()           # reads DIFFUSION_JAX_* or detects the cluster
  distributed.check_agreement(config)  # same config hash and code version everywhere

Where the coordinator comes from, first match wins:
  1. arguments of initialize(coordinator=..., num_processes=..., process_id=...);
  2. the environment, as launch/local.py, slurm.sh and gke_jobset.yaml set it:
       DIFFUSION_JAX_COORDINATOR     host:port of process 0 ('auto' = let JAX detect the cluster)
       DIFFUSION_JAX_NUM_PROCESSES   number of processes
       DIFFUSION_JAX_PROCESS_ID      this process, 0 .. N-1
       DIFFUSION_JAX_LOCAL_DEVICES   fake CPU devices per process (CPU only)
       DIFFUSION_JAX_LOCAL_DEVICE_IDS  GPUs this process drives, '0,1,2,3' (default: JAX's
                                     choice, which under SLURM is the one GPU of SLURM_LOCALID)
       DIFFUSION_JAX_INIT_TIMEOUT    seconds to wait for the coordinator and the others (default 300)
  3. a cluster JAX detects by itself (Cloud TPU VM or pod slice, GKE TPU, SLURM, Open MPI):
     jax.distributed.initialize() with no address;
  4. nothing: a single process, no distributed runtime.

On CPU the cross-process collectives are gloo's (jax_cpu_collectives_implementation).
A coordinator that is not reachable within the timeout is a CoordinatorUnreachable
error; processes that connect but never all register are ended by JAX itself
after the same timeout (DEADLINE_EXCEEDED), so a launch never hangs.
"""
import glob
import hashlib
import os
import socket
import sys
import time

import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax import config as config_lib
from diffusion_jax import paths

ENV_COORDINATOR = "DIFFUSION_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DIFFUSION_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DIFFUSION_JAX_PROCESS_ID"
ENV_LOCAL_DEVICES = "DIFFUSION_JAX_LOCAL_DEVICES"
ENV_INIT_TIMEOUT = "DIFFUSION_JAX_INIT_TIMEOUT"
ENV_LOCAL_DEVICE_IDS = "DIFFUSION_JAX_LOCAL_DEVICE_IDS"
DEFAULT_TIMEOUT_S = 300

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class CoordinatorUnreachable(ConnectionError):
  """No coordinator answered at the given address within the timeout."""


class ProcessMismatch(ValueError):
  """The processes of one run disagree on the config or the code."""


def _env_int(name: str):
  text = os.environ.get(name, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{name}={text!r} is not an integer") from None


def cluster_detected() -> bool:
  """Whether JAX's own cluster detection has something to find (no network queries).

  SLURM and Open MPI announce themselves in the environment; a Cloud TPU VM
  (GCE or GKE) has TPU device files, and on GKE also TPU_WORKER_HOSTNAMES.
  """
  if all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                   "SLURM_LOCALID")):
    return True
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    return True
  if "TPU_WORKER_HOSTNAMES" in os.environ:
    return True
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def wait_for_coordinator(address: str, timeout_s: float, *, process_id=None, num_processes=None) -> None:
  """Polls a TCP connect to host:port until it answers; CoordinatorUnreachable after timeout_s.

  JAX's own client aborts the whole process (a C++ CHECK failure, no Python
  exception) when the coordinator does not answer, so the non-coordinator
  processes look first and fail with a sentence instead.
  """
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} is not host:port")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  last_error = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(2.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      last_error = e
    if time.monotonic() >= deadline:
      who = f"process {process_id} of {num_processes}" if process_id is not None else "this process"
      raise CoordinatorUnreachable(
          f"{who} could not reach the coordinator at {address} within {timeout_s:g}s ({last_error}); "
          "is process 0 running, and are the address and port right?")
    time.sleep(0.25)


def _env_ids(name: str):
  text = os.environ.get(name, "").strip()
  if not text:
    return None
  try:
    return [int(i) for i in text.split(",")]
  except ValueError:
    raise ValueError(f"{name}={text!r} is not a comma-separated list of device ids") from None


def initialize(coordinator=None, num_processes=None, process_id=None, local_device_count=None,
               timeout_s=None, local_device_ids=None) -> bool:
  """Joins the JAX distributed system (see the module docstring); returns whether it did.

  Must run before the first use of a device. Idempotent: a second call in an
  initialised process returns True without doing anything.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR, "").strip() or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  local_device_count = local_device_count if local_device_count is not None else _env_int(ENV_LOCAL_DEVICES)
  local_device_ids = local_device_ids if local_device_ids is not None else _env_ids(ENV_LOCAL_DEVICE_IDS)
  if timeout_s is None:
    timeout_s = _env_int(ENV_INIT_TIMEOUT) or DEFAULT_TIMEOUT_S

  if jax.distributed.is_initialized():
    return True
  if local_device_count is not None:
    if local_device_count < 1:
      raise ValueError(f"local_device_count={local_device_count} must be >= 1")
    # Fake CPU devices per process; only the CPU backend reads it.
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  # Gloo runs the cross-process collectives of CPU devices (JAX's default in
  # 0.10, set so that a changed default cannot silently break CPU runs).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")

  if coordinator is None or coordinator == "auto":
    if coordinator is None and not cluster_detected():
      if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ValueError(f"num_processes={num_processes}, process_id={process_id} given without a coordinator "
                         f"address (set {ENV_COORDINATOR}=host:port)")
      return False  # one process on its own
    _announce(f"joining the cluster JAX detects (timeout {timeout_s}s)")
    jax.distributed.initialize(num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids, initialization_timeout=int(timeout_s))
    return True

  if num_processes is None or process_id is None:
    raise ValueError(f"coordinator {coordinator!r} needs num_processes and process_id "
                     f"({ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
  if process_id != 0:
    wait_for_coordinator(coordinator, timeout_s, process_id=process_id, num_processes=num_processes)
  _announce(f"process {process_id} of {num_processes} joining coordinator {coordinator} "
            f"(the others must join within {timeout_s}s)")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=int(timeout_s))
  return True


def _announce(message: str) -> None:
  print(f"diffusion_jax.distributed: {message}", file=sys.stderr, flush=True)


def code_version(package_dir: str = PACKAGE_DIR) -> str:
  """sha256 (16 hex digits) over the relative paths and bytes of the package's .py files."""
  digest = hashlib.sha256()
  paths = sorted(glob.glob(os.path.join(package_dir, "**", "*.py"), recursive=True))
  for path in paths:
    digest.update(os.path.relpath(path, package_dir).encode() + b"\0")
    with open(path, "rb") as f:
      digest.update(f.read() + b"\0")
  return digest.hexdigest()[:16]


def _allgather_text(text: str) -> list[str]:
  """Every process's `text` (ASCII, at most 64 chars), in process order."""
  encoded = np.zeros(64, np.uint8)
  raw = text.encode("ascii")[:64]
  encoded[:len(raw)] = np.frombuffer(raw, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(encoded)).reshape(jax.process_count(), 64)
  return [bytes(row).rstrip(b"\0").decode("ascii") for row in gathered]


def check_agreement(config, *, code: str | None = None) -> dict:
  """Raises ProcessMismatch unless every process has the same config hash and code version.

  Every process receives all values, so all of them raise (or pass) together;
  nothing hangs on a process that went its own way. Returns
  {'config_hash': ..., 'code_version': ...} of this process.
  """
  mine = dict(config_hash=config_lib.config_hash(config), code_version=code or code_version())
  if jax.process_count() == 1:
    return mine
  for name, value in mine.items():
    values = _allgather_text(value)
    if len(set(values)) > 1:
      listing = ", ".join(f"process {i}: {v}" for i, v in enumerate(values))
      what = "config (train with the same --config and overrides everywhere)" if name == "config_hash" else \
          "code (install the same diffusion_jax source on every host)"
      raise ProcessMismatch(f"the {jax.process_count()} processes disagree on the {what}: {name} {listing}")
  return mine


def saved_process_count(manager, step: int):
  """How many processes wrote the data-iterator state of checkpoint `step`; None if it holds none."""
  data_dir = paths.join(str(manager.directory), str(step), "data")
  counts = {int(name.rsplit("-of-", 1)[1][:-len(".json")])
            for name in paths.listdir(data_dir) if name.startswith("process_") and name.endswith(".json")} \
      if paths.isdir(data_dir) else set()
  if len(counts) > 1:
    raise ValueError(f"{data_dir} mixes data states of {sorted(counts)} processes")
  return counts.pop() if counts else None


def resume_data_iterator(manager, step: int, data_iter) -> str:
  """Puts this process's fresh data iterator where checkpoint `step` left the run; returns how.

  The iterator state is per process (each reads source[process_index::count]),
  so it only means something to a run with the same process count:
    'restored'  same count: this process's saved state, exactly once over the epoch;
    'skipped'   another count (or no saved state): the new iterator (new shard) is
                advanced by `step` local batches, so the run has drawn step x
                global_batch rows as before and goes on deterministically; within
                the epoch in progress some examples repeat and others are left out.
  Skipping reads and packs those batches once, on every process (minutes for a
  long run on a large step).
  """
  if saved_process_count(manager, step) == jax.process_count():
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
    return "restored"
  for _ in range(step):
    next(data_iter)
  return "skipped"


def process_zero_first(fn, *args, **kwargs):
  """Runs fn on process 0, then, after a barrier, on all others; returns this process's result.

  For one-time work on storage the processes may share, such as building a
  dataset (sources.ensure_dataset): process 0 builds it, the others then find
  it built (on a shared filesystem) or build their own copy (on local disks),
  never two writers at once in one directory. If process 0 fails, it exits
  and JAX ends the waiting processes after its heartbeat timeout.
  """
  if jax.process_count() == 1:
    return fn(*args, **kwargs)

  result = fn(*args, **kwargs) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("diffusion_jax.distributed.process_zero_first")
  if jax.process_index() != 0:
    result = fn(*args, **kwargs)
  return result
