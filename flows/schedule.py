"""Scheduled retraining: serve the training flow as a deployment with a cron schedule.

    prefect server start --host 127.0.0.1 --port 4200                 # terminal 1 (schedules need a server)
    export PREFECT_API_URL=http://127.0.0.1:4200/api                   # terminal 2
    crossmodal schedule --cron "0 3 * * *" --timezone Europe/Paris      # serves until Ctrl-C / SIGTERM

``prefect deployment run crossmodal-training/crossmodal-retrain`` triggers a run at once. The same deployment is
declared in ``prefect.yaml`` for ``prefect deploy`` with a worker.
"""

from __future__ import annotations

import os
from typing import Any

from crossmodal.errors import UserError

DEPLOYMENT_NAME = "crossmodal-retrain"


class ScheduleError(UserError, RuntimeError):
    """The schedule cannot be served; the message says what to do."""


def build_deployment(cron: str, timezone: str = "UTC", params_path: str = "params.yaml",
                     overrides: dict[str, Any] | None = None, name: str = DEPLOYMENT_NAME):
    """A RunnerDeployment of the training flow with an explicit-timezone cron schedule."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from flows.training import training_flow

    try:  # validate here so a typo fails with one line, not a traceback from the server
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as err:
        raise ScheduleError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None
    from prefect.schedules import Cron

    return training_flow.to_deployment(
        name=name,
        schedule=Cron(cron, timezone=timezone),
        parameters={"params_path": os.path.abspath(params_path), "overrides": overrides or {}},
        tags=["crossmodal", "retraining"],
        description="Retrain every crossmodal head on the current data and run the promotion gate.",
    )


def serve(cron: str, timezone: str = "UTC", params_path: str = "params.yaml",
          overrides: dict[str, Any] | None = None, name: str = DEPLOYMENT_NAME) -> None:
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ScheduleError("schedules need a running Prefect server: start one with "
                            "`prefect server start --host 127.0.0.1 --port 4200` and set "
                            "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(cron, timezone, params_path, overrides, name), pause_on_shutdown=False)
