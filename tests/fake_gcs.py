"""A local Google Cloud Storage for the gs:// tests: ``python tests/fake_gcs.py PORT BUCKET``.

gcp-storage-emulator, in memory, with one thing added that TensorStore needs: a download's
``x-goog-generation`` header. TensorStore takes an object's generation from it and makes
its next conditional write on that generation (Orbax's OCDBT manifest); without it the
write fails as "Malformed StorageGeneration", as it never would on the real service.
"""

import os
import sys
import time

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # the emulator's own handler answers a missing object
        obj = None
    if obj is not None:
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module binds its routes

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).start()
    # Serve until the test process is gone: its exit still uploads (tensorboardX's GCS
    # writers flush at exit, retrying for two minutes if nobody answers).
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)  # the server's thread is not a daemon
