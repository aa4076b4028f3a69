"""The errors a user can act on: bad data, bad configuration, a missing encoder, a refused promotion.

Every one subclasses :class:`UserError` and carries a message that names the file, row, column or setting and what
to do. The CLI prints such an error as one line (exit code 2) and the Prefect flow logs it without a traceback;
anything else is a bug and keeps its traceback. They live together so that the CLI and the log filter can test
``isinstance(err, UserError)`` without importing the stages that raise them.
"""

from __future__ import annotations

import logging


class UserError(Exception):
    """An error the user can fix; its message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing or invalid; the message says which and why."""


class DataError(UserError, ValueError):
    """A problem with the input data that the user can fix; the message names file, column or row."""


class FeatureError(DataError):
    """The validated table cannot be turned into features; the message names the file, column or row."""


class ValidationFailed(UserError, RuntimeError):
    """The data cannot be used as is: wrong schema, too many rows quarantined, fewer than 2 classes left."""


class ManifestError(ValidationFailed, DataError):
    """``read_manifest`` rejected the manifest (catch either ``ValidationFailed`` or ``DataError``)."""


class EncoderUnavailable(UserError, RuntimeError):
    """An encoder cannot be loaded; the message names it, where its weights were looked for, and what to do."""


class UnknownEncoder(EncoderUnavailable, ValueError):
    """The name is neither registered nor a model the fallback families know; the message lists the choices."""


class TrainError(UserError, ValueError):
    """Inputs to training are inconsistent (names the file, the column or the split, and what to do)."""


class FinetuneError(TrainError):
    """Fine-tuning cannot run with these inputs or settings; the message says which and what to do."""


class PredictionInputError(UserError, ValueError):
    """The input frame cannot be scored; the message names the column or row."""


class PromotionError(UserError, RuntimeError):
    """A promotion or rollback request cannot be carried out; the message says why."""


class ModelUnavailable(UserError, LookupError):
    """The registered model version asked for does not exist (no champion yet, an unknown version)."""


class TrackingUnavailable(UserError, RuntimeError):
    """The MLflow tracking server cannot be reached, after MLflow's own HTTP retries."""


class ClusterError(UserError, RuntimeError):
    """Tasks cannot run where the settings say: no Dask scheduler answers, or a worker cannot see the run's files."""


class ReportError(UserError, RuntimeError):
    """The run's report cannot be built or found: a file it needs is gone; the message says which and what to do."""


class HideUserErrorTracebacks(logging.Filter):
    """A logging filter that drops the traceback from records about a user error (the message stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            record.exc_info = None
            record.exc_text = None
        return True
