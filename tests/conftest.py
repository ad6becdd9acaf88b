"""Pytest settings and fixtures only: CPU only, few threads per worker. Code the test modules share (the micro
config, tolerances, the multi-process harness, tiny models, ...) lives in ``tests/helpers/`` and is imported as
``helpers.<module>`` (see helpers/__init__.py)."""
import os
import sys

# helpers/ is imported as ``helpers``: pytest's default (prepend) import mode puts tests/ on sys.path already; this
# keeps it there under other import modes too (spawned workers inherit sys.path).
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# Triton kernels run through the interpreter on CPU; it must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.micro import MICRO  # noqa: E402

# pytest-xdist runs 2 workers on 2 cores: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def server():
    """The stub VLM server of ``helpers.vlm_server`` (set its ``behaviour``); every request it got must have been
    well formed."""
    from helpers.vlm_server import FakeVLM

    fake = FakeVLM()
    yield fake
    fake.close()
    assert not fake.schema_errors, f"the labeller sent malformed requests: {fake.schema_errors[:3]}"


@pytest.fixture
def micro_overrides():
    """A fresh copy of ``helpers.micro.MICRO``: a world + model small enough for end-to-end tests."""
    return list(MICRO)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Kernels fill their outputs with NaN before writing them (VIDPO_POISON_OUTPUTS=1), so an element a kernel
    forgets to write fails the comparison (``helpers.tolerances.assert_close_to_float64`` rejects non-finite
    values). Modules opt in with ``pytestmark = pytest.mark.usefixtures("poison_outputs")``."""
    monkeypatch.setenv("VIDPO_POISON_OUTPUTS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine two threads wait on each other (10x slower).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
