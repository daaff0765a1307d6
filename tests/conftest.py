"""Test-wide settings: offline, CPU, one intra-op thread (the CI machine has 2 cores).

One thread for the whole suite: the models here are tiny, and on a loaded 2-core machine two torch threads made
their steps up to 30x slower. A parent that never ran a multi-threaded OpenMP region can also fork DDP workers
(``ddp_fork``) without them hanging on the inherited thread pool.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_market(tmp_path_factory) -> str:
    """A small synthetic Market-1501 tree, written once per session."""
    from pedlightning.data.synthetic import write_market1501

    root = str(tmp_path_factory.mktemp("market") / "market1501")
    write_market1501(root, num_train_ids=16, num_test_ids=12, seed=0)
    return root


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI(args=...) warns when pytest's own argv is also present."""
    import sys

    monkeypatch.setattr(sys, "argv", ["pedlightning"])


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the suite's default already, pinned for modules that rely on it (tiny
    models, fork-started DDP workers) should a test or the default change it.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
