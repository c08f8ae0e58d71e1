"""Share the pipeline's outputs through the DVC remote, saying which remote a failure concerns.

    python -m mnist_lifecycle.remote push     # dvc push --run-cache (make push)
    python -m mnist_lifecycle.remote pull     # dvc pull (make pull)

DVC does the work; a wrong key, for one, fails with S3's bare "Forbidden", so on failure this
names the remote, its URL and endpoint, and where its credentials come from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from . import config

COMMANDS = {"push": ["dvc", "push", "--run-cache"], "pull": ["dvc", "pull"]}


def describe_default_remote(root) -> str:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return "no default remote (`dvc remote add -d NAME URL`)"
        remote = repo.config["remote"].get(name, {})
    endpoint = f", endpoint {remote['endpointurl']}" if remote.get("endpointurl") else ""
    credentials = (" (credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the remote's "
                   "access_key_id/secret_access_key)") if str(remote.get("url", "")).startswith("s3://") else ""
    return f"remote '{name}' ({remote.get('url')}{endpoint}){credentials}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_lifecycle.remote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=sorted(COMMANDS))
    args = parser.parse_args(argv)
    root = config.project_root()
    status = subprocess.run(COMMANDS[args.action], cwd=root).returncode
    if status:
        print(f"error: dvc {args.action} failed for {describe_default_remote(root)}. Files are "
              "transferred whole or not at all; running it again resumes", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
