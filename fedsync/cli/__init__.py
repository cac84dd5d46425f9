"""The `fedsync` command line. Errors are one line on stderr and exit code 2, never a traceback."""

from fedsync.cli._common import CommandError
from fedsync.cli._main import build_parser, main

__all__ = ["CommandError", "build_parser", "main"]
