"""Exceptions tl_sinks raises for input it cannot analyse honestly."""

from __future__ import annotations


class UnsupportedModelError(NotImplementedError):
    """The model lacks a hook or structure a stage needs."""


class NonFiniteActivationError(ValueError):
    """An activation the analysis reads holds NaN or inf."""


class ModelLoadError(ValueError):
    """A model's files are missing, broken or inconsistent (config vs weights, corrupt weights,
    no tokenizer): the message names the file."""


class ModelNotAvailableError(OSError):
    """The model is neither a local directory nor in the Hugging Face cache, and cannot be downloaded."""
