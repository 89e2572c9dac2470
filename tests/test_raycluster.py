"""Joining an existing cluster: the driver sends Ray's auth token exactly when the head asks for one."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline import raycluster

pytestmark = pytest.mark.unit


@pytest.fixture
def token_mode(monkeypatch):
    """Record whether the pipeline turned token mode on (Ray's own switch, stubbed)."""
    import ray._private.authentication.authentication_token_setup as setup

    calls = []
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(setup, "maybe_enable_token_auth_if_token_available", lambda **kw: calls.append(kw) or True)
    return calls


# The old rule enabled token mode whenever a token existed: raylets of a head without auth were then refused.
# An unclear answer (None) keeps Ray's own rule: token mode when a token exists.
@pytest.mark.parametrize("head_answer, token_mode_on", [(False, False), (True, True), (None, True)])
def test_the_driver_follows_the_heads_answer(token_mode, monkeypatch, head_answer, token_mode_on):
    monkeypatch.setattr(raycluster, "_head_requires_token", lambda address: head_answer)
    raycluster._token_auth_like_the_head("127.0.0.1:6379")
    assert len(token_mode) == int(token_mode_on)


def test_a_mode_the_user_chose_is_kept(token_mode, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(raycluster, "_head_requires_token", lambda address: pytest.fail("no probe"))
    raycluster._token_auth_like_the_head("127.0.0.1:6379")
    assert token_mode == []


def test_an_unreachable_head_is_left_to_ray_init_without_waiting():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.perf_counter()
    assert raycluster._head_requires_token(f"127.0.0.1:{port}") is None
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("address, expected", [("10.0.0.1:6379", ("10.0.0.1", 6379)), ("[::1]:6379", ("::1", 6379)),
                                               ("ray://10.0.0.1:10001", None), ("head", None)])
def test_only_host_port_addresses_are_probed(address, expected):
    assert raycluster._host_port(address) == expected


class _StoppedInDel:
    """An object whose finaliser is interrupted by the exception an actor's stop signal becomes."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error

    def __del__(self) -> None:
        raise self.error("stopped")


@pytest.mark.unit
def test_a_trial_stopped_in_a_finaliser_prints_no_traceback_and_other_errors_still_show(monkeypatch, capsys):
    """Ray raises SystemExit from the SIGTERM that stops a trial's actor; landing in a finaliser, Python printed
    "Exception ignored in ... SystemExit" with a traceback to the terminal. The quiet process drops that one."""
    import sys

    from pipeline.config import PipelineConfig

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    raycluster.quiet_this_process(PipelineConfig())
    raycluster.quiet_this_process(PipelineConfig())  # a reused actor quiets itself again: wrapped once
    assert sys.unraisablehook.drops_stop_signal
    _StoppedInDel(SystemExit)
    assert "Exception ignored" not in capsys.readouterr().err
    _StoppedInDel(ValueError)
    assert "ValueError: stopped" in capsys.readouterr().err
