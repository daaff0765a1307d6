"""Test-wide settings: offline, CPU, few threads (the CI machine has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


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
    """Tiny models run fastest on one thread; two threads on a loaded 2-core machine were 30x slower here.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
