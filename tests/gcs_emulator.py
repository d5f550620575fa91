"""Runs gcp-storage-emulator on 127.0.0.1:PORT for the gs:// tests (python tests/gcs_emulator.py PORT).

One fix on top of the emulator: its media downloads carry no
`x-goog-generation` header, so TensorStore (Orbax's array writer) reads
generation 0 and then refuses its own conditional write of the OCDBT manifest
("Malformed StorageGeneration"). Real GCS always sends the header; here the
download handler (routed directly, and called by `get` for ?alt=media) is
wrapped to send it too.
"""
import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the wrapped handler already answered 404
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def main(port: int) -> None:
  objects.download = download_with_generation  # objects.get calls it for ?alt=media reads
  patched = 0
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is _download:
        methods[method] = download_with_generation
        patched += 1
  # Without the patch TensorStore's checkpoint writes fail later with an obscure generation error.
  if not patched:
    raise SystemExit("gcs_emulator: found no download handler in gcp_storage_emulator.server.HANDLERS to "
                     "patch; this emulator version is not supported (see setup.py's dev extra)")
  emulator = server.create_server("127.0.0.1", port, in_memory=True)
  emulator.start()
  try:
    while True:
      time.sleep(3600)
  finally:
    emulator.stop()


if __name__ == "__main__":
  main(int(sys.argv[1]))
