"""Fixtures shared by the tests; the tiny-model builders they use live in builders.py.

Tests write only inside temporary directories. Before anything else is imported (huggingface_hub,
datasets and matplotlib read their folders at import), every cache and config folder the suite's
libraries derive from the home directory is pointed into one temporary directory: HOME itself (for
the tools that know no other variable: selenium's driver cache, chromium's ~/.pki, mlflow), lorakit's
cache (LORAKIT_CACHE; LORAKIT_HOME is dropped), XDG_CACHE_HOME / XDG_CONFIG_HOME / XDG_DATA_HOME /
XDG_STATE_HOME, HF_HOME, MPLCONFIGDIR and wandb's folders. Subprocesses inherit them. The embedded
model converted once per machine is linked in read-only from the real cache (never converted there);
at the end of the session any file that appeared under the real home's cache, config and data
folders fails the run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SANDBOX = Path(tempfile.mkdtemp(prefix="lorakit-tests-"))
LIBRARY_ENV = {"XDG_CONFIG_HOME": SANDBOX / "xdg-config", "XDG_DATA_HOME": SANDBOX / "xdg-data",
               "XDG_STATE_HOME": SANDBOX / "xdg-state", "HF_HOME": SANDBOX / "huggingface",
               "MPLCONFIGDIR": SANDBOX / "matplotlib", "WANDB_DIR": SANDBOX / "wandb",
               "WANDB_CACHE_DIR": SANDBOX / "wandb-cache", "WANDB_CONFIG_DIR": SANDBOX / "wandb-config"}
HOME_ENV = {"HOME": SANDBOX / "home", "XDG_CACHE_HOME": SANDBOX / "xdg-cache", "LORAKIT_CACHE": SANDBOX / "lorakit"}


def _point_into_sandbox(env: dict[str, Path]) -> None:
    for name, path in env.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)


_point_into_sandbox(LIBRARY_ENV)  # first: importing lorakit below must find the libraries' folders moved already
from lorakit.fileio import cache_root  # noqa: E402

REAL_CACHE = cache_root()  # where lorakit keeps its caches for the user, read before HOME_ENV moves it
HOME = Path.home()  # the real home, watched below
_point_into_sandbox(HOME_ENV)
os.environ.pop("LORAKIT_HOME", None)  # LORAKIT_CACHE wins anyway; a test that sets its own root sets LORAKIT_CACHE

WATCHED = [HOME / ".cache", HOME / ".config", HOME / ".local"]  # walked whole; HOME itself: its entries
IGNORED = [HOME / ".cache" / "pip", HOME / ".config" / "pip", REAL_CACHE / "models"]


def _home_files() -> set[Path]:
    """Every file and folder under the watched parts of the real home (pip's cache and the model cache
    the suite links to are left out), and the entries of the home folder itself."""
    found = set(HOME.iterdir()) if HOME.is_dir() else set()
    for top in WATCHED:
        for folder, dirs, files in os.walk(top):
            here = Path(folder)
            dirs[:] = [d for d in dirs if not any((here / d).is_relative_to(i) for i in IGNORED)]
            found |= {here / n for n in dirs + files}
    return found


HOME_BEFORE = _home_files()

import pytest  # noqa: E402  (after the environment above: see the module docstring)
import torch  # noqa: E402
from builders import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tts, write_tiny_model  # noqa: E402, F401


def _link_embedded_model() -> None:
    """The embedded model's converted cache, linked read-only from the real cache when it is complete
    there (no reconversion); without one the first test that needs it converts it inside the sandbox."""
    from lorakit.models.load import CACHE_MARKER, DEFAULT_MODEL

    real = REAL_CACHE / "models" / DEFAULT_MODEL
    if (real / CACHE_MARKER).is_file():
        (SANDBOX / "lorakit" / "models").mkdir(parents=True, exist_ok=True)
        (SANDBOX / "lorakit" / "models" / DEFAULT_MODEL).symlink_to(real, target_is_directory=True)


_link_embedded_model()


def pytest_sessionfinish(session):
    """Fail the run if any file appeared in the real home while the suite ran; then drop the sandbox."""
    new = sorted(_home_files() - HOME_BEFORE)
    shutil.rmtree(SANDBOX, ignore_errors=True)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"tests wrote {len(new)} path(s) outside their temporary directories, in the real home:",
                 *(f"  {p}" for p in new[:20]), *(["  ..."] if len(new) > 20 else []),
                 "point the library that wrote them at a tmp_path (see tests/conftest.py)"]
        if reporter:
            for line in lines:
                reporter.write_line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 64, (2, 9))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + char tokenizer saved as a transformers directory (safetensors)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread, and the suite shares 2 cores; the real model gets all."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
