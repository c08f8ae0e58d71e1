"""Create (or reset the password of) the tracking server's read-only account for the model server.

    MLFLOW_TRACKING_URI=http://tracking:5000 MLFLOW_TRACKING_USERNAME=<admin> \
    MLFLOW_TRACKING_PASSWORD=<admin password> READER_USERNAME=model-server READER_PASSWORD=... \
    python reader_account.py

Run once per start by compose.yaml's `reader-account` service, with the admin's credentials, which
the model server itself never gets. The account is an ordinary user: basic_auth.ini's
default_permission (READ) lets it read every experiment, run, artifact and registered model, and
change or delete none that others own (tests/test_tracking_server.py checks both).
"""

from __future__ import annotations

import os
import sys

from mlflow.exceptions import RestException
from mlflow.server.auth.client import AuthServiceClient


def ensure_reader(client: AuthServiceClient, username: str, password: str) -> str:
    """'created' or 'updated': the account exists with that password and no admin rights."""
    try:
        client.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        return "created"
    client.update_user_password(username, password)
    client.update_user_admin(username, False)
    return "updated"


def main() -> int:
    username, password = os.environ["READER_USERNAME"], os.environ["READER_PASSWORD"]
    client = AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"])
    print(f"read-only account {username!r} {ensure_reader(client, username, password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
