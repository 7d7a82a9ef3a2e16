"""The test session caches processed datasets and compiled kernels in a folder of its own, never in the user's
~/.cache/seqrec: in the test process and in the `train.py` processes it starts (tests/conftest.py)."""

import subprocess
import sys
from pathlib import Path

from seqrec.utils.private_dir import cache_root
from tests.conftest import CLI_ENV

PRINT_CACHE_ROOT = "from seqrec.utils.private_dir import cache_root; print(cache_root())"


def test_the_session_caches_in_its_own_folder_here_and_in_the_processes_it_starts():
    here = cache_root()
    assert here != Path.home() / ".cache" / "seqrec" and here.name.startswith("seqrec-test-cache-")
    child = subprocess.run([sys.executable, "-c", PRINT_CACHE_ROOT], env=CLI_ENV, capture_output=True, text=True)
    assert child.returncode == 0 and Path(child.stdout.strip()) == here, child.stderr
