"""Every error the studio raises on purpose: what was received, what was expected, how to fix it.

Only ``cli.py`` and ``web/`` turn these into exit codes or UI messages; library code raises them.
"""

from __future__ import annotations


class StudioError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is one line fit for a terminal."""

    exit_code = 1

    def __init__(self, problem: str, *, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} Fix: {fix}")


class ConfigError(StudioError):
    """A configuration value or file is invalid."""

    exit_code = 2


class InputError(StudioError):
    """A user-supplied input (image, prompt, option, file) is invalid."""

    exit_code = 3


class ImageError(InputError):
    """An image cannot be read or written safely."""


class IdentityError(InputError):
    """An identity name, enrolment, file or consent state does not allow the requested use."""


class TemplateError(InputError):
    """A multi-person template's name, file or cast does not fit (see ``studio template``)."""


class ContentBlockedError(InputError):
    """A prompt or a picture is blocked by the content check (safety.*): nothing is written for it."""

    exit_code = 11


class ModelError(StudioError):
    """A model is unknown, missing, corrupt or not allowed."""

    exit_code = 4


class ModelNotFoundError(ModelError):
    """A catalogued model has no file on disk."""


class ChecksumError(ModelError):
    """A model file's sha256 does not match the catalogue."""


class LicenceError(ModelError):
    """A model's licence forbids the requested use."""


class DownloadError(ModelError):
    """A model download failed."""


class UnsafeFileError(ModelError):
    """A file would need unpickling and pickle formats are not allowed."""


class AdapterError(ModelError):
    """A face-adapter file does not fit this base model, face encoder or format version."""


class RuntimeSetupError(StudioError):
    """The requested device or execution provider cannot be used."""

    exit_code = 5


class OutputError(StudioError):
    """A file cannot be written (disk full, no permission, read-only folder); nothing partial is left."""

    exit_code = 6


class RefineError(StudioError):
    """A refine changed nothing (no face, too few faces for the mapping): no file is written."""

    exit_code = 7
