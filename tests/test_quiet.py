"""TensorFlow's import notices stay off the console of `fedsync simulate` and `coordinator serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_tensorflow_imports_without_its_onednn_notice_and_output_comes_back() -> None:
    result = _run(
        "import sys\n"
        "from fedsync._quiet import import_tensorflow_quietly\n"
        "import_tensorflow_quietly()\n"
        "assert 'tensorflow' in sys.modules\n"
        "print('stdout back'); print('stderr back', file=sys.stderr)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "oneDNN" not in result.stderr
    assert result.stdout.strip() == "stdout back"
    assert result.stderr.strip().endswith("stderr back")


def test_a_plain_import_does_print_the_notice() -> None:
    # The notice this module hides is really there: without it the test above proves nothing.
    result = _run("import tensorflow")
    assert result.returncode == 0, result.stderr
    assert "oneDNN" in result.stderr
