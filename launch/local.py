"""Runs N processes x M fake CPU devices of one command on this machine: a multi-host run on localhost.

  python launch/local.py --processes=2 --devices=4 -- \
      python -m diffusion_jax train --config=configs/dit_image.py:smoke --workdir=/tmp/mh

Each process gets the environment that diffusion_jax.distributed.initialize() reads:
  DIFFUSION_JAX_COORDINATOR=127.0.0.1:<free port>   DIFFUSION_JAX_NUM_PROCESSES=N
  DIFFUSION_JAX_PROCESS_ID=i                         DIFFUSION_JAX_LOCAL_DEVICES=M
plus JAX_PLATFORMS=cpu. Output lines are prefixed with [i]. When one process
fails, the others are ended (they would wait for it forever); the exit status
is the first failure's, or 0. --timeout bounds the whole run.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  """A TCP port nobody listens on now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, coordinator: str, processes: int, process_id: int, devices: int,
                timeout_s: int) -> dict:
  env = dict(base)
  env.update(
      DIFFUSION_JAX_COORDINATOR=coordinator,
      DIFFUSION_JAX_NUM_PROCESSES=str(processes),
      DIFFUSION_JAX_PROCESS_ID=str(process_id),
      DIFFUSION_JAX_LOCAL_DEVICES=str(devices),
      DIFFUSION_JAX_INIT_TIMEOUT=str(timeout_s),
      JAX_PLATFORMS="cpu",
  )
  # A device count inherited from the caller (tests force 8) must not win over ours.
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _pump(stream, prefix: str, sink) -> None:
  for line in iter(stream.readline, b""):
    sink.write(f"{prefix}{line.decode(errors='replace')}")
    sink.flush()


def launch(command, *, processes: int, devices: int, port: int = 0, timeout_s: float = 600,
           init_timeout_s: int = 60, out=None) -> int:
  """Runs `command` (argv list) as `processes` processes; returns the exit status (see module doc)."""
  if processes < 1 or devices < 1:
    raise ValueError(f"--processes={processes} and --devices={devices} must be >= 1")
  if not command:
    raise ValueError("no command given (put it after --)")
  out = out or sys.stdout
  coordinator = f"127.0.0.1:{port or free_port()}"
  print(f"launch: {processes} processes x {devices} CPU devices, coordinator {coordinator}: "
        f"{subprocess.list2cmdline(command)}", file=out, flush=True)
  children, pumps = [], []
  for i in range(processes):
    env = process_env(os.environ, coordinator=coordinator, processes=processes, process_id=i, devices=devices,
                      timeout_s=init_timeout_s)
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    children.append(child)
    pump = threading.Thread(target=_pump, args=(child.stdout, f"[{i}] ", out), daemon=True)
    pump.start()
    pumps.append(pump)

  deadline = time.monotonic() + timeout_s
  status = 0
  try:
    while True:
      codes = [c.poll() for c in children]  # poll every child: each poll is what sets its returncode
      if None not in codes:
        break
      failed = [code for code in codes if code not in (None, 0)]
      if failed or time.monotonic() > deadline:
        status = failed[0] if failed else 124
        why = f"a process exited with status {status}" if failed else f"the run passed --timeout={timeout_s:g}s"
        print(f"launch: {why}; ending the others", file=out, flush=True)
        break
      time.sleep(0.2)
  finally:
    for c in children:  # only the processes started here, each by its own process group
      if c.poll() is None:
        os.killpg(c.pid, signal.SIGTERM)
    for c in children:
      try:
        c.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(c.pid, signal.SIGKILL)
        c.wait()
    for p in pumps:
      p.join(timeout=5)
  if status == 0:
    status = next((c.returncode for c in children if c.returncode != 0), 0)
  return status


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=2, help="number of processes (N)")
  parser.add_argument("--devices", type=int, default=4, help="fake CPU devices per process (M)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds before every process is ended")
  parser.add_argument("--init-timeout", type=int, default=60,
                      help="seconds a process waits for the coordinator and the others")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  try:
    return launch(command, processes=args.processes, devices=args.devices, port=args.port,
                  timeout_s=args.timeout, init_timeout_s=args.init_timeout)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
