"""One path layer: every file the project reads or writes, local or in a bucket (gs://, s3://).

Paths stay strings everywhere; these helpers route them through etils.epath,
what Orbax, Grain and tfds use, so a `gs://bucket/run` workdir, dataset or
export takes the same code as `/tmp/run`. epath reaches gs:// through fsspec
(gcsfs) where TensorFlow is not installed, as here. Local paths behave
exactly as os.path and open() would.

Object stores have no rename and no append, so:
  - `local_dir(out)` gives writers that need a real file (imageio, ffmpeg,
    numpy) a local folder and uploads it to a remote `out` when they finish;
  - `replace_text` writes a remote object whole (a single PUT is atomic there)
    and a local file through a temporary name and os.replace.
"""
import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile

from etils import epath

HASH_CHUNK = 1 << 22  # 4 MiB reads while hashing
# What epath needs for each scheme when TensorFlow is absent (it then goes through fsspec).
FSSPEC_PACKAGES = {"gs": ("gcsfs", "pip install 'diffusion_jax[gcs]'"), "s3": ("s3fs", "pip install s3fs")}


def _path(path) -> epath.Path:
  """epath.Path of `path`; a clear error when a bucket's filesystem package is not installed."""
  text = os.fspath(path)
  scheme = text.split("://", 1)[0] if "://" in text else None
  if scheme in FSSPEC_PACKAGES:
    package, hint = FSSPEC_PACKAGES[scheme]
    if importlib.util.find_spec(package) is None:
      raise ValueError(f"{text}: {scheme}:// paths need the {package} package ({hint})")
  return epath.Path(text)


def is_remote(path) -> bool:
  """Whether `path` is a URI (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """A local path made absolute; a URI unchanged (os.path.abspath would make gs://b/x './gs:/b/x')."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(base, *parts) -> str:
  """os.path.join for local paths and URIs alike."""
  return os.fspath(_path(base).joinpath(*parts)) if is_remote(base) else os.path.join(base, *parts)


def exists(path) -> bool:
  return _path(path).exists()


def isdir(path) -> bool:
  return _path(path).is_dir()


def isfile(path) -> bool:
  return _path(path).is_file()


def listdir(path) -> list[str]:
  """Names in a directory (like os.listdir)."""
  return sorted(p.name for p in _path(path).iterdir())


def makedirs(path) -> None:
  _path(path).mkdir(parents=True, exist_ok=True)


def size(path) -> int:
  """A file's size in bytes."""
  return _path(path).stat().length


def read_text(path) -> str:
  return _path(path).read_text(encoding="utf-8")


def read_bytes(path) -> bytes:
  return _path(path).read_bytes()


def replace_text(path, text: str) -> None:
  """Writes `text` to `path` so that a reader sees the old content or the new, never half of it."""
  path = os.fspath(path)
  if is_remote(path):
    _path(path).write_text(text, encoding="utf-8")  # one object upload: all or nothing
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def rmtree(path) -> None:
  path = _path(path)
  if path.exists():
    path.rmtree()


def walk_files(root) -> list[str]:
  """Every file under `root`, as paths relative to it ('/'-separated), sorted."""
  root = os.fspath(root)
  if not is_remote(root):
    return sorted(os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                  for d, _, names in os.walk(root) for n in names)
  found = []

  def visit(directory, prefix):  # epath refuses rglob on buckets; one listing per directory
    for child in directory.iterdir():
      if child.is_dir():
        visit(child, f"{prefix}{child.name}/")
      else:
        found.append(prefix + child.name)

  visit(_path(root), "")
  return sorted(found)


def sha256(path) -> str:
  """Hex sha256 of a file's bytes, read in chunks (bounded memory for multi-GB files)."""
  digest = hashlib.sha256()
  with _path(path).open("rb") as f:
    while chunk := f.read(HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def copytree(source, target) -> None:
  """Copies a directory tree between any two of local disk and a bucket."""
  source, target = os.fspath(source), os.fspath(target)
  if not is_remote(source) and not is_remote(target):
    shutil.copytree(source, target)
    return
  for relative in walk_files(source):
    copy_file(join(source, relative), join(target, relative))


def copy_file(source, target) -> None:
  """Copies one file between any two of local disk and a bucket (epath's own copy would open
  both ends with the bucket's backend), in chunks."""
  target = _path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  with _path(source).open("rb") as src, target.open("wb") as dst:
    while chunk := src.read(HASH_CHUNK):
      dst.write(chunk)


@contextlib.contextmanager
def local_dir(out):
  """A local directory to write `out`'s files into: `out` itself when local (created), else a
  temporary folder uploaded to `out` (merged into what is there) when the block ends without error."""
  out = os.fspath(out)
  if not is_remote(out):
    os.makedirs(out, exist_ok=True)
    yield out
    return
  with tempfile.TemporaryDirectory(prefix="diffusion_jax_upload_") as staging:
    yield staging
    copytree(staging, out)
