"""latentvl's input errors: one base class, one subclass per place where input is read.

Every input error is an :class:`InputError` (a ``ValueError``) whose message names what is wrong and
where: the sample id, the field, the file (and line). Catch ``InputError`` for "bad input of any kind";
catch a subclass to tell where it was found (``RecordError`` from :mod:`latentvl.data.records`,
``SampleError`` from :mod:`latentvl.inference.generate`, ...). This module is every error's one home:
import them from here.
"""

from __future__ import annotations

__all__ = [
    "CollatorInputError",
    "DatasetImportError",
    "ImageReadError",
    "InputError",
    "LatentConfigError",
    "LatentInputError",
    "ModelFormatError",
    "RecordError",
    "SampleError",
    "TrainConfigError",
    "TrainDataError",
]


class InputError(ValueError):
    """Bad input; the message names the sample, field or file."""


class LatentConfigError(InputError):
    """A latent config field has an invalid value; the message names the field and the value."""


class TrainConfigError(InputError):
    """A training option is invalid; the message starts with the option's name."""


class RecordError(InputError):
    """A record (or a record file) is invalid; the message names the file, line and id."""


class CollatorInputError(InputError):
    """A record cannot be collated; the message names the sample id and the field."""


class LatentInputError(InputError):
    """The latent inputs of a batch are inconsistent; the message names sample, segment and reason."""


class TrainDataError(InputError):
    """The training data cannot be used as configured; the message names the file (and record)."""


class DatasetImportError(InputError):
    """An import as a whole cannot run (bad arguments, unreadable input, missing dependency)."""


class ImageReadError(InputError):
    """An image cannot be read; ``kind`` is ``missing_image``, ``unreadable_image`` or ``invalid_input``
    (not an image or a path) and the message says why, without saying whose image it is (the caller adds
    the sample and field)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class SampleError(InputError):
    """One sample cannot run at inference; ``kind`` is one of ``missing_image``, ``unreadable_image``,
    ``too_long``, ``invalid_input``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ModelFormatError(InputError):
    """A model directory latentvl will not load (pickled ``*.bin`` weights only: a pickle can run code);
    the message names the directory and its files."""

