"""Errors lorakit raises on purpose. Each message names the thing and how to fix it."""


class LorakitError(ValueError):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError):
    """A LoraConfig, recipe or CLI value is invalid."""


class TargetError(LorakitError):
    """A target pattern matched nothing, or matched a module LoRA cannot wrap."""


class AdapterError(LorakitError):
    """An adapter name is unknown, already taken, or in the wrong state."""


class AdapterFormatError(LorakitError):
    """An adapter directory or file on disk is missing, malformed, or unsafe."""


class ShapeMismatchError(AdapterFormatError):
    """An adapter's tensors do not fit the model it is loaded onto."""


class DataError(LorakitError):
    """A dataset file is malformed (messages carry file:line)."""


class ModelLoadError(LorakitError):
    """A model spec cannot be resolved or loaded."""


class TrainingError(LorakitError):
    """A training run cannot go on (non-finite loss, unusable output directory, bad checkpoint)."""
