"""lorakit/fileio.py's cache root, and the suite's promise built on it: tests write only inside
temporary directories (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lorakit.data.cache import default_cache_dir
from lorakit.fileio import cache_root

TESTS = Path(__file__).resolve().parent
VARIABLES = ("LORAKIT_CACHE", "LORAKIT_HOME", "XDG_CACHE_HOME")


@pytest.fixture
def bare(monkeypatch, tmp_path):
    """No cache variable set and a home of our own: ~/.cache/lorakit is tmp_path/home/.cache/lorakit."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_cache_root_order(bare, monkeypatch):
    assert cache_root() == bare / "home" / ".cache" / "lorakit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(bare / "xdg"))
    assert cache_root() == bare / "xdg" / "lorakit"
    monkeypatch.setenv("LORAKIT_HOME", str(bare / "old"))
    assert cache_root() == bare / "old"  # the older name beats XDG
    monkeypatch.setenv("LORAKIT_CACHE", str(bare / "new"))
    assert cache_root() == bare / "new"  # and LORAKIT_CACHE beats every other
    assert default_cache_dir() == bare / "new" / "tokenized"


def test_cache_root_without_lorakit_home(bare, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(bare / "xdg"))
    monkeypatch.setenv("LORAKIT_CACHE", "~/lk")
    assert cache_root() == bare / "home" / "lk"  # ~ expands
    monkeypatch.setenv("LORAKIT_CACHE", "")  # empty counts as unset
    assert cache_root() == bare / "xdg" / "lorakit"


def test_relative_xdg_cache_home_is_ignored(bare, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: ignore a relative path
    assert cache_root() == bare / "home" / ".cache" / "lorakit"


def test_the_suite_caches_in_its_sandbox():
    """tests/conftest.py moved lorakit's cache and the libraries' home-derived folders into one
    temporary directory (read here from the environment: ``import conftest`` may find another conftest)."""
    sandbox = Path(os.environ["HOME"]).parent
    assert sandbox.is_relative_to(Path(tempfile.gettempdir())) and "LORAKIT_HOME" not in os.environ
    # LORAKIT_CACHE may be a session fixture's own temporary cache (tests/export, tests/models) by now
    assert cache_root().is_relative_to(Path(tempfile.gettempdir()))
    for name in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "MPLCONFIGDIR", "WANDB_DIR"):
        assert Path(os.environ[name]).parent == sandbox, name


@pytest.mark.slow  # a whole pytest run in a fresh interpreter (~10 s)
def test_a_file_written_to_home_fails_the_run(tmp_path):
    """The suite's conftest run on a one-test suite that writes to ~/.cache by a fixed path (as a library
    that reads the home folder from elsewhere than HOME would): the test passes, the run fails and names
    the file. The run's home is tmp_path/home, so nothing reaches the real one."""
    suite, home = tmp_path / "suite", tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    suite.mkdir()
    (suite / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    # the run's own HOME is a sandbox: the test writes by a fixed path, as a library bypassing HOME would
    leak = home / ".cache" / "leak.txt"
    (suite / "test_leak.py").write_text(f"def test_leak():\n    open({str(leak)!r}, 'w').write('x')\n")
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)], cwd=suite,
                          env=env, capture_output=True, text=True, timeout=300)
    assert "1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED and str(leak) in proc.stdout
