"""Reaching the Hugging Face Hub for a hub-id model spec: online when the hub answers, else the local
HF cache, failing fast (one short request decides, never a long timeout per file)."""

from __future__ import annotations

import contextlib
import os

from ..errors import ModelLoadError

HUB_TIMEOUT_S = 5.0


def from_hub(repo_id: str, load, default_model: str, accepted_specs: str):
    """Run ``load(local_only)``: online when the hub answers, else from the local HF cache, failing fast.

    Args:
        repo_id: the hub id.
        load: ``load(local_only: bool)``, raising ModelLoadError when it cannot.
        default_model: the embedded model's spec, offered when the hub cannot be reached.
        accepted_specs: the list of accepted model specs, shown when the repo does not exist.
    """
    local_only = _hub_offline() or not _hub_reachable(repo_id, accepted_specs)
    try:
        if not local_only:
            return load(False)
        with _offline_hub():
            return load(True)
    except ModelLoadError as exc:
        if not local_only:
            raise
        raise ModelLoadError(
            f"{repo_id}: the Hugging Face Hub could not be reached (offline, or no network) and the model is "
            "not in the local HF cache. Pass a local model directory (config.json + *.safetensors), a .gguf "
            f"file, or the embedded default '{default_model}'.") from exc


@contextlib.contextmanager
def _offline_hub():
    """Make huggingface_hub offline for this block, so even its side requests (user-agent lookup) stay off.

    It reads HF_HUB_OFFLINE once, at import, and looks the constant up at each call: setting it here
    honours an HF_HUB_OFFLINE set later, and a hub we just found unreachable.
    """
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set now (huggingface_hub reads it only at import)."""
    from huggingface_hub.constants import is_offline_mode

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return is_offline_mode() or any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _hub_reachable(repo_id: str, accepted_specs: str) -> bool:
    """One short request for the repo's info: False when the hub cannot be reached at all."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as exc:
        raise ModelLoadError(f"{repo_id}: gated on the hub; accept its terms and log in (hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id}: no such model on the hub (or it is private)\n{accepted_specs}") from exc
    except Exception:  # DNS, refused, timeout, proxy, 5xx: the network's many ways of saying "unreachable"
        return False
    return True
