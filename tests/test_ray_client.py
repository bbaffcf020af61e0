"""Joining Ray: the job server's "no agent yet" refusal is retried, every other refusal is not.

Ray's job server gives that answer only while its job agent has not registered (just after a cluster
starts, or on an overloaded node), which a test cannot bring about on purpose; the retry rule is checked
here on a client object that answers as Ray's does, and the real submissions are in test_evals_ray.py and
test_serve_ray.py.
"""

import pytest

from lucid.ray_client import NO_AGENT, submit_job


class _Client:
    def __init__(self, failures: list[Exception]):
        self.failures, self.calls = list(failures), []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)
        return "raysubmit_1"


def _refusal(text: str) -> RuntimeError:
    return RuntimeError(f"Request failed with status code 500: {text}")


def test_no_agent_yet_is_retried_until_the_job_is_taken():
    client = _Client([_refusal(NO_AGENT + ", please try again later."), _refusal(NO_AGENT)])
    assert submit_job(client, wait_s=0.0, entrypoint="lucid eval") == "raysubmit_1"
    assert len(client.calls) == 3 and all(c == {"entrypoint": "lucid eval"} for c in client.calls)


def test_other_refusals_and_a_lasting_no_agent_are_raised():
    client = _Client([_refusal("401 Unauthorized")])
    with pytest.raises(RuntimeError, match="401"):
        submit_job(client, wait_s=0.0, entrypoint="x")
    assert len(client.calls) == 1
    client = _Client([_refusal(NO_AGENT)] * 3)
    with pytest.raises(RuntimeError, match=NO_AGENT):
        submit_job(client, attempts=3, wait_s=0.0, entrypoint="x")
    assert len(client.calls) == 3
