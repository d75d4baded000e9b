import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Checkpoint hashes are cached per user (workbench/runtime/checkpoint_hash.py): not by the tests,
# and not in the user's cache. Subprocesses (CLI, ranks) inherit it.
os.environ["WORKBENCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="workbench-test-cache-")
atexit.register(shutil.rmtree, os.environ["WORKBENCH_CACHE_DIR"], ignore_errors=True)

# Two cores shared by everything: keep each test process's thread pool small and deterministic.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
