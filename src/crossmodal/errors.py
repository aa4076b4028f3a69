"""The errors a user can act on: bad data, bad configuration, a missing encoder, a refused promotion.

Each carries a message that names the file, row, column or setting and what to do; the CLI prints it as one line
(exit code 2) and the Prefect flow logs it without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging


def user_errors() -> tuple[type[BaseException], ...]:
    from crossmodal.config import ConfigError
    from crossmodal.data import DataError
    from crossmodal.encoders import EncoderUnavailable
    from crossmodal.model import PredictionInputError
    from crossmodal.promotion import PromotionError
    from crossmodal.tracking import TrackingUnavailable
    from crossmodal.train import TrainError
    from crossmodal.validate import ValidationFailed

    return (ConfigError, DataError, ValidationFailed, EncoderUnavailable, TrainError, PromotionError,
            PredictionInputError, TrackingUnavailable)


class HideUserErrorTracebacks(logging.Filter):
    """A logging filter that drops the traceback from records about a user error (the message stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, user_errors()):
            record.exc_info = None
            record.exc_text = None
        return True
