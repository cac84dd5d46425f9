"""Suite-wide settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _template_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Converted TFLite templates persist under FEDSYNC_CACHE_DIR (fedsync._template_cache): one
    fresh folder per session, never the user's ~/.cache. Subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDSYNC_CACHE_DIR", str(tmp_path_factory.mktemp("fedsync-cache")))
        yield
