"""Silencing TensorFlow's native chatter (C++ logs and converter prints) on the paths that run it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator


def quiet_tensorflow_logs() -> None:
    """Call before TensorFlow is imported: keep its C++ INFO/WARNING logs off the console."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Redirect file descriptors 1 and 2 to /dev/null (the TFLite converter prints from C++)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with fds 1 and 2 silenced: its import prints a oneDNN notice before absl's
    logging starts, which no log level reaches. Call from the main thread before other threads
    write (their output would be lost meanwhile). A missing TensorFlow is left for its users to report."""
    if "tensorflow" in sys.modules:
        return
    quiet_tensorflow_logs()
    with native_output_silenced(), contextlib.suppress(ImportError):
        import tensorflow  # noqa: F401
