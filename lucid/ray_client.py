"""How Lucid's Ray clients (eval jobs, the service, the CLI) join a cluster: Ray's token rule, one error line.

Imports nothing of Lucid (a bottom room): `lucid eval`, `lucid serve`, the service's eval-job client and
the eval job's driver all call it.
"""

from __future__ import annotations

import os
from pathlib import Path


def ray_token_available() -> bool:
    """Whether Ray would find an auth token here: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
    ~/.ray/auth_token (where `ray get-auth-token --generate` and a token-auth head write it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def ray_auth() -> None:
    """A cluster started with token auth (`RAY_AUTH_MODE=token ray start ...`) only accepts clients that
    send its token, and a client only sends it with RAY_AUTH_MODE=token set before Ray reads its config.
    Ray's own rule for that (a token available and RAY_AUTH_MODE unset: token mode), applied for this
    process and its children. A cluster without token auth ignores the token."""
    if "RAY_AUTH_MODE" in os.environ or not ray_token_available():
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # also refreshes Ray's cached config
    except ImportError:  # another Ray version: the environment variable alone
        pass
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # for child processes (e.g. the job's own ray.init)


def ray_refusal(e: Exception, address: str | None) -> str:
    """One line for Ray refusing to start or to let us join (for `lucid eval` and `lucid serve`)."""
    first = " ".join(str(e).split())[:400] or type(e).__name__
    where = f"join the Ray cluster at {address}" if address else "start Ray"
    return f"could not {where}: {type(e).__name__}: {first}"


#: Ray's job server answers this (HTTP 500) while no job agent has registered yet, e.g. just after the cluster
#: started or while its node is overloaded; it asks the client to try again later.
NO_AGENT = "No available agent to submit job"


def submit_job(client, attempts: int = 5, wait_s: float = 2.0, **kwargs) -> str:
    """`client.submit_job(**kwargs)` (a `JobSubmissionClient`), retried while Ray's job server has no job agent
    yet (up to `attempts` tries, `wait_s` apart, doubling); any other refusal is raised at once. With a
    `submission_id` in kwargs a retry cannot submit the job twice (Ray refuses a reused id)."""
    import time

    for attempt in range(attempts):
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if NO_AGENT not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(wait_s * 2**attempt)
    raise AssertionError("unreachable")
