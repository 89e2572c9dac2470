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


def test_a_head_without_auth_gets_no_token_even_when_a_token_file_exists(token_mode, monkeypatch):
    # the old rule enabled token mode whenever a token existed: raylets of a head without auth were then refused
    monkeypatch.setattr(raycluster, "_head_requires_token", lambda address: False)
    raycluster._token_auth_like_the_head("127.0.0.1:6379")
    assert token_mode == []


def test_a_head_that_asks_for_a_token_gets_one(token_mode, monkeypatch):
    monkeypatch.setattr(raycluster, "_head_requires_token", lambda address: True)
    raycluster._token_auth_like_the_head("127.0.0.1:6379")
    assert len(token_mode) == 1


def test_a_mode_the_user_chose_is_kept(token_mode, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(raycluster, "_head_requires_token", lambda address: pytest.fail("no probe"))
    raycluster._token_auth_like_the_head("127.0.0.1:6379")
    assert token_mode == []


def test_an_unclear_answer_keeps_rays_own_rule(token_mode, monkeypatch):
    monkeypatch.setattr(raycluster, "_head_requires_token", lambda address: None)
    raycluster._token_auth_like_the_head("127.0.0.1:6379")
    assert len(token_mode) == 1


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
