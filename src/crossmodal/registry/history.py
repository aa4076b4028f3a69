"""The champion's history: every move of the ``champion`` alias of a registered model, kept for good.

    from crossmodal.registry.history import append_entry, read_history, rollback_target
    append_entry("crossmodal-fusion", "3", previous="2", action="promote", reason="fixes the night-time photos")
    read_history("crossmodal-fusion")
    # [{"seq": 1, "version": "1", "previous": None, "action": "gate", "reason": "no champion yet",
    #   "at": "2025-06-01T03:00:12+00:00", "by": "ci"}, ...]
    rollback_target(read_history("crossmodal-fusion"), current="3")   # "2"

Each entry is one registered-model tag ``crossmodal.history.NNNNNN`` holding the entry as JSON, numbered from 1;
an entry is written once and never changed or removed, and nothing else needs updating (no counter to drift from
the entries). One tag per entry because a tag's value is bounded: MLflow accepts up to 100,000 characters for a
registered-model tag, but its SQL stores keep them in a VARCHAR(5000) column, so a history in one tag would have
to drop entries sooner or later. An entry is a few hundred characters; a reason is capped at ``MAX_REASON_CHARS``.
Writers hold the gate lock (``crossmodal.registry.promotion.gate_lock``), so two moves never take the same number.

The tag of older releases, ``crossmodal.champion_history`` (a comma list of versions, which rollback truncated),
is read as the first entries, action ``legacy``, and left as it is.

Actions: ``gate`` (the gate promoted a challenger), ``promote`` (``crossmodal promote``), ``rollback``
(``crossmodal rollback``). Rolling back undoes the latest move not yet undone: replaying the entries as a stack
(``gate``, ``promote`` and ``legacy`` push a version, ``rollback`` pops one) gives the champion before the current
one, so rolling back twice goes two moves back.
"""

from __future__ import annotations

import getpass
import json
import os
from datetime import datetime, timezone
from typing import Any

from crossmodal.errors import PromotionError

ENTRY_PREFIX = "crossmodal.history."
LEGACY_TAG = "crossmodal.champion_history"
ACTIONS = ("gate", "promote", "rollback")
MAX_REASON_CHARS = 2000  # with the other fields, well inside the 5000 characters a SQL store keeps per tag
_DIGITS = 6


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _model_tags(model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(_client().get_registered_model(model_name).tags or {})
    except MlflowException:
        raise PromotionError(f"no registered model named {model_name!r}; check --model-name (mlflow.model_name) "
                             "and the tracking store (mlflow.tracking_uri, MLFLOW_TRACKING_URI)") from None


def _legacy(tags: dict[str, str]) -> list[dict[str, Any]]:
    versions = [v.strip() for v in tags.get(LEGACY_TAG, "").split(",") if v.strip()]
    return [{"seq": None, "version": v, "previous": versions[k - 1] if k else None, "action": "legacy",
             "reason": f"recorded by an older release in the tag {LEGACY_TAG}", "at": None, "by": None}
            for k, v in enumerate(versions)]


def _entries(tags: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for key, value in tags.items():
        number = key[len(ENTRY_PREFIX):]
        if key.startswith(ENTRY_PREFIX) and number.isdigit():
            entry = json.loads(value)
            entry["seq"] = int(number)
            out.append(entry)
    return sorted(out, key=lambda e: e["seq"])


def read_history(model_name: str) -> list[dict[str, Any]]:
    """Every move of ``champion``, oldest first: ``{seq, version, previous, action, reason, at, by}`` (legacy entries
    from the old comma tag first, with ``seq``, ``at`` and ``by`` None). PromotionError for an unknown model."""
    tags = _model_tags(model_name)
    return _legacy(tags) + _entries(tags)


def user_name() -> str:
    """Who is moving the alias: the MLflow server's user name when one is set, else the login name."""
    name = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return os.environ.get("USER") or "unknown"


def check_reason(reason: str) -> None:
    """PromotionError for a reason the history cannot keep whole; call before moving the alias."""
    if len(reason) > MAX_REASON_CHARS:
        raise PromotionError(f"the reason is {len(reason)} characters long; the history keeps at most "
                             f"{MAX_REASON_CHARS}: shorten it")


def append_entry(model_name: str, version: str, previous: str | None, action: str, reason: str) -> dict[str, Any]:
    """Append one entry (call under the gate lock); returns it with its ``seq``."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    check_reason(reason)
    tags = _model_tags(model_name)
    seq = max((e["seq"] for e in _entries(tags)), default=0) + 1
    entry = {"version": str(version), "previous": None if previous is None else str(previous), "action": action,
             "reason": reason, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "by": user_name()}
    _client().set_registered_model_tag(model_name, f"{ENTRY_PREFIX}{seq:0{_DIGITS}d}",
                                       json.dumps(entry, ensure_ascii=False))
    return {"seq": seq, **entry}


def champion_stack(history: list[dict[str, Any]]) -> list[str]:
    """The champions a rollback can return to, oldest first, the current one last: every move replayed, a rollback
    undoing the latest move not yet undone."""
    stack: list[str] = []
    for entry in history:
        if entry["action"] == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry["version"]:  # the alias was moved outside crossmodal before
                stack.append(entry["version"])
        else:
            stack.append(entry["version"])
    return stack


def rollback_target(history: list[dict[str, Any]], current: str | None) -> str | None:
    """The version ``champion`` held before ``current``, per ``history``; None when there is none.

    When the alias was moved outside crossmodal (``current`` is not the last champion the history knows), the last
    champion the history knows is the one to go back to.
    """
    stack = champion_stack(history)
    if stack and current is not None and stack[-1] != current:
        return stack[-1]
    return stack[-2] if len(stack) >= 2 else None


def format_history(history: list[dict[str, Any]]) -> str:
    """The history as a table for the terminal, oldest first."""
    header = ("#", "version", "previous", "action", "at (UTC)", "by", "reason")
    rows = [(str(e["seq"] if e["seq"] is not None else "-"), str(e["version"]), str(e["previous"] or "-"),
             e["action"], (e["at"] or "-").replace("+00:00", "Z"), e["by"] or "-", e["reason"]) for e in history]
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)
