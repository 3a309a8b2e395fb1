"""The session's setup (offline hubs, a token-store cache of its own) and the fixtures; what tests share otherwise
is in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests import forked_cli
from tests.helpers import LLAMA, QWEN2, TEST_DATA, save_base

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# token stores the tests build go to a folder of this session, never the user's ~/.cache (subprocesses inherit it)
os.environ.setdefault("TRAINER_DATA_CACHE", tempfile.mkdtemp(prefix="trainer-test-stores-"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models in-process: a second BLAS thread only adds contention on a busy machine (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_dir() -> Path:
    return TEST_DATA


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("llama"), LLAMA)


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("qwen2"), QWEN2)


def pytest_sessionstart(session: pytest.Session) -> None:
    """The server the trainer's processes are forked from (tests/forked_cli.py) imports beside the collection."""
    if forked_cli.enabled() and not runs_no_tests(session.config):
        forked_cli.start_server()


def runs_no_tests(config: pytest.Config) -> bool:
    """The pytest-xdist controller (`-n 2`): its workers run the tests, each with its own server."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n 2 --dist loadgroup`): tests that launch several processes run one at a time on one
    worker (each already uses every core), and each other module stays on one worker, so its module fixtures are
    built once; the two workers then run a multi-process test and single-process modules side by side. Without
    pytest-xdist the groups mean nothing and are not added (its `xdist_group` marker would be unknown). On 2 cores it
    does not pay (measured quiet: 27.5 minutes with `-n 2`, 24.4 without): it is for machines with more cores."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "multiprocess" if item.get_closest_marker("multiprocess") else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many trainer processes were forked and which variables made the others start fresh
    (tests/forked_cli.py): a variable listed here that is not read at import costs every later call its imports."""
    if forked_cli.calls:
        terminalreporter.write_sep("-", "trainer processes forked from pre-imported libraries (tests/forked_cli.py)")
        for how, count in forked_cli.calls.most_common():
            terminalreporter.write_line(f"{count:5d}  {how}")
