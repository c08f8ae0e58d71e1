"""MLflow basic auth with a budget for password checks, against wrong-password floods.

basic_auth.ini names `auth_throttle:authenticate_request` as the tracking server's
authorization_function (compose.yaml mounts this file beside it and puts it on PYTHONPATH).

Checking a password costs a deliberately slow hash (~0.15 s of CPU here), and MLflow only caches
successful checks: a client sending wrong passwords as fast as it is answered kept both cores
busy and made valid clients 15x slower (benchmarks/auth_flood.py). Here each worker process
remembers the credentials it has verified: for MLFLOW_AUTH_VERIFIED_TTL seconds it answers them
without hashing, and for KNOWN_TTL it checks them again without limit (one hash a minute per
client). Any other check spends a token from a bucket refilled at MLFLOW_AUTH_CHECKS_PER_SECOND
(burst MLFLOW_AUTH_CHECKS_BURST); without a token the request gets 429 with Retry-After and no
hashing at all, after a pause of a second (on at most TARPIT_SLOTS requests at once per worker,
threads that sleep without CPU) so that a flooding client also stops costing request handling.
MLflow's clients retry 429 by themselves. The price: during a flood a client's
first request to a worker may wait for a token, and a changed password keeps working on a worker
until its verified entry expires (as with MLflow's own cache on the other workers).
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time

from flask import make_response, request
from mlflow.server.auth import authenticate_request_basic_auth
from werkzeug import Response

CHECKS_PER_SECOND = float(os.environ.get("MLFLOW_AUTH_CHECKS_PER_SECOND", "1"))
BURST = float(os.environ.get("MLFLOW_AUTH_CHECKS_BURST", "5"))
VERIFIED_TTL = float(os.environ.get("MLFLOW_AUTH_VERIFIED_TTL", "60"))
KNOWN_TTL = 3600.0  # a credential verified within this time is checked again outside the budget
TARPIT_SECONDS = 1.0
TARPIT_SLOTS = 32  # of the 40 request threads of a worker (anyio's default): 8 stay free for others
MAX_VERIFIED = 10_000  # entries kept per worker; expired ones are dropped first

# Per process, regenerated at each start: the digests are useless outside this process.
_KEY = secrets.token_bytes(32)
_lock = threading.Lock()
_tarpit = threading.BoundedSemaphore(TARPIT_SLOTS)
_verified: dict[bytes, float] = {}  # digest of (username, password) -> when it was last verified
_tokens = BURST
_refilled = time.monotonic()


def _digest(username: str, password: str) -> bytes:
    return hmac.new(_KEY, f"{username}\0{password}".encode(), "sha256").digest()


def _take_token(now: float) -> bool:
    global _tokens, _refilled
    _tokens = min(BURST, _tokens + (now - _refilled) * CHECKS_PER_SECOND)
    _refilled = now
    if _tokens >= 1:
        _tokens -= 1
        return True
    return False


def authenticate_request():
    authorization = request.authorization
    if authorization is None or not authorization.username:
        return authenticate_request_basic_auth()  # MLflow's 401 asking for credentials
    key = _digest(authorization.username, authorization.password or "")
    now = time.monotonic()
    with _lock:
        verified = _verified.get(key)
        if verified is not None and now - verified < VERIFIED_TTL:
            return authorization
        refused = (verified is None or now - verified >= KNOWN_TTL) and not _take_token(now)
        wait = max(1, round((1 - _tokens) / CHECKS_PER_SECOND))
    if refused:
        if _tarpit.acquire(blocking=False):
            try:
                time.sleep(TARPIT_SECONDS)
            finally:
                _tarpit.release()
        response = make_response(f"Too many password checks on this server; retry in {wait} s.", 429)
        response.headers["Retry-After"] = str(wait)
        return response
    result = authenticate_request_basic_auth()
    if not isinstance(result, Response):  # MLflow's answer to a wrong password is a 401 response
        with _lock:
            if len(_verified) >= MAX_VERIFIED:
                for stale in [k for k, when in _verified.items() if now - when >= KNOWN_TTL] or list(_verified)[:1000]:
                    _verified.pop(stale, None)
            _verified[key] = now
    return result
