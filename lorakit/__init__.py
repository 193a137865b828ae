"""lorakit: LoRA fine-tuning for PyTorch. Public API re-exports only."""

from .errors import (
    AdapterError,
    AdapterFormatError,
    ConfigError,
    DataError,
    LorakitError,
    ModelLoadError,
    ShapeMismatchError,
    TargetError,
)
from .lora.adapters import (
    TrainableReport,
    active_adapters,
    combine,
    delete_adapter,
    disable_adapters,
    list_adapters,
    set_active,
    trainable_report,
)
from .lora.apply import load_adapter
from .lora.config import LoraConfig
from .lora.inject import Target, inject, plan_injection
from .lora.io import read_adapter, save_adapter
from .lora.layer import LoraEmbedding, LoraLinear, ModulesToSave
from .lora.merge import merge, merge_and_unload, merged_adapters, unmerge
from .lora.mixed import mixed_batch
from .lora.quantize import quantize

__version__ = "0.1.0"


def __getattr__(name: str):
    """``lk.fit`` (training from Python) and the preference functions load the training stack on first use:
    ``import lorakit`` stays light."""
    if name == "fit":
        from .train.api import fit

        return fit
    if name == "preference_batch":
        from .data.preference import preference_batch

        return preference_batch
    if name == "preference_loss":
        from .train.losses.preference import preference_loss

        return preference_loss
    if name == "sequence_logps":
        from .train.objectives.logps import sequence_logps

        return sequence_logps
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = [
    "AdapterError", "AdapterFormatError", "ConfigError", "DataError", "LoraConfig", "LoraEmbedding",
    "LoraLinear", "LorakitError", "ModelLoadError", "ModulesToSave", "ShapeMismatchError", "Target",
    "TargetError", "TrainableReport", "active_adapters", "combine", "delete_adapter", "disable_adapters", "fit",
    "inject", "list_adapters", "load_adapter", "merge", "merge_and_unload", "merged_adapters", "mixed_batch",
    "plan_injection", "preference_batch", "preference_loss", "quantize", "read_adapter", "save_adapter",
    "sequence_logps", "set_active", "trainable_report", "unmerge",
]
