"""Refuse to start the team deployment on an empty, placeholder or short secret.

    python check_secrets.py NAME [NAME ...]

Each NAME is an environment variable holding a secret (compose.yaml's `secrets-check` service
passes them from deploy/.env). Exits 1 naming every variable that is empty, still holds a
`change-me` placeholder of .env.example, or is shorter than MIN_LENGTH characters; 0 otherwise.
Compose's `${VAR:?}` already stops on unset or empty variables; the placeholders pass it, which
is why this runs before the services that use them.
"""

from __future__ import annotations

import os
import sys

MIN_LENGTH = 16
PLACEHOLDER = "change-me"


def problems(names: list[str], environ: dict[str, str]) -> list[str]:
    found = []
    for name in names:
        value = environ.get(name, "")
        if not value.strip():
            found.append(f"{name} is empty")
        elif PLACEHOLDER in value.lower():
            found.append(f"{name} still holds the placeholder {value!r} of .env.example")
        elif len(value) < MIN_LENGTH:
            found.append(f"{name} has {len(value)} characters; use at least {MIN_LENGTH}")
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: check_secrets.py NAME [NAME ...]", file=sys.stderr)
        return 2
    found = problems(argv, dict(os.environ))
    for problem in found:
        print(f"deploy/.env: {problem}", file=sys.stderr)
    if found:
        print('set each in deploy/.env, e.g. python -c "import secrets; print(secrets.token_urlsafe(24))"',
              file=sys.stderr)
        return 1
    print(f"secrets-check: {len(argv)} secrets set")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
