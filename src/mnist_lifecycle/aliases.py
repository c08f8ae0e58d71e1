"""Alias moves with their history, and rollback of `@champion` (docs/promotion.md#rollback).

Every move of an alias through `move` is recorded as a tag of the registered model,
`alias_history.<NNNNNN>` = JSON {time, alias, from_version, to_version, by, reason}: the history
lives in the tracking store beside the aliases it explains, visible in the MLflow UI.
"""

from __future__ import annotations

import getpass
import json
import time

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

HISTORY_TAG = "alias_history."
# Tagged on a version that a rollback moved `@champion` away from: the gate does not promote it again.
ROLLED_BACK_TAG = "rolled_back"


class RollbackError(ValueError):
    """A rollback that cannot be done; the message says why."""


def current(model_name: str, alias: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def history(model_name: str) -> list[dict]:
    """Every recorded alias move of the model, oldest first."""
    tags = MlflowClient().get_registered_model(model_name).tags
    return [json.loads(tags[key]) for key in sorted(k for k in tags if k.startswith(HISTORY_TAG))]


def move(model_name: str, alias: str, version: str, by: str, reason: str) -> dict | None:
    """Point `alias` at `version` and record the move; None (nothing recorded) if it is there already."""
    client = MlflowClient()
    before = current(model_name, alias)
    if before == str(version):
        return None
    client.set_registered_model_alias(model_name, alias, str(version))
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "alias": alias,
             "from_version": before, "to_version": str(version), "by": by, "reason": reason}
    number = len([k for k in client.get_registered_model(model_name).tags if k.startswith(HISTORY_TAG)])
    client.set_registered_model_tag(model_name, f"{HISTORY_TAG}{number + 1:06d}", json.dumps(entry))
    return entry


def who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a container without a passwd entry
        return "unknown user"


def rollback(model_name: str, alias: str, reason: str, to_version: str | None = None) -> dict:
    """Move `alias` back to the version it pointed at before its last move (or to `to_version`),
    recording why; the version moved away from is tagged so that the gate does not promote it again."""
    if not reason.strip():
        raise RollbackError("say why: a rollback is recorded with its reason (--reason)")
    client = MlflowClient()
    before = current(model_name, alias)
    if to_version is None:
        moves = [entry for entry in history(model_name) if entry["alias"] == alias]
        if not moves or moves[-1]["from_version"] is None:
            raise RollbackError(f"{model_name}@{alias} has no previous version in its history; name one with --to")
        to_version = moves[-1]["from_version"]
    try:
        client.get_model_version(model_name, str(to_version))
    except MlflowException:
        raise RollbackError(f"{model_name} has no version {to_version}; {model_name}@{alias} stays "
                            f"at version {before}") from None
    entry = move(model_name, alias, str(to_version), f"{who()} (registry rollback)", f"rollback: {reason}")
    if entry is None:
        raise RollbackError(f"{model_name}@{alias} is version {to_version} already")
    if before is not None:
        client.set_model_version_tag(model_name, before, ROLLED_BACK_TAG, f"{entry['time']}: {reason}")
    # Rolled back to on purpose: a version restored by hand is trusted again.
    if ROLLED_BACK_TAG in client.get_model_version(model_name, str(to_version)).tags:
        client.delete_model_version_tag(model_name, str(to_version), ROLLED_BACK_TAG)
    return entry
