"""The endpoint on Ray Serve, as RL trainers and operators meet it: the clients' requests replayed (see
``tests/test_rl_handoff.py`` for where each comes from), the token on ``/metadata``, a bounded queue, ``stop`` on a
shared cluster, a Serve that already runs elsewhere, and SIGTERM on ``run_pipeline.py serve``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import serving
from pipeline.config import load_config
from tests import chat_styles
from tests.helpers import serve_port
from tests.test_rl_handoff import rollout

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
TOKEN_ENV = "NORMBT_TEST_ENDPOINT_TOKEN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployed(ray_session, tmp_path_factory):
    """A ChatML-style reward model behind Ray Serve with a bearer token and a queue of 2: ``(url, cfg, service)``."""
    folder = chat_styles.reward_model_folder("chatml", tmp_path_factory.mktemp("served") / "rm", seed=5)
    port = serve_port()
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"serve.model={folder}", f"serve.port={port}",
                                                        f"serve.token_env={TOKEN_ENV}", "serve.max_queued_requests=2",
                                                        "serve.max_batch_tokens=1024"])
    os.environ[TOKEN_ENV] = "s3cret"
    url = serving.start(cfg)
    yield url, cfg, serving.RewardService(folder, max_length=cfg.rewardbench.max_length, truncation_side="left")
    serving.stop()
    del os.environ[TOKEN_ENV]


def post(url: str, body, token: str | None = "s3cret"):
    import requests

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    return requests.post(url, json=body, headers=headers, timeout=180)


def test_the_rl_clients_requests_are_answered_as_they_parse_them(deployed):
    url, _, service = deployed
    queries = rollout(service, 1024)
    expected = service.rewards([ids for ids, _ in service.encode_texts(queries)]).tolist()
    legacy = post(f"{url}/get_reward", {"query": queries})  # OpenRLHF before v0.10: a whole rollout (was 413)
    assert legacy.status_code == 200 and legacy.json()["rewards"] == pytest.approx(expected, abs=1e-5)
    first = post(f"{url}/get_reward", {"query": queries[:1], "prompts": ["p"], "labels": [None]}).json()
    assert first["rewards"] == pytest.approx(expected[:1], abs=1e-5)  # OpenRLHF v0.11: one sample per POST
    extra = post(f"{url}/get_reward", {"query": [], "prompts": [], "labels": []})  # the second server (was 422)
    assert extra.status_code == 200 and extra.json() == {"rewards": [], "truncated": []}
    factory = post(f"{url}/v1/score/evaluation", {"model": "model", "messages": queries[:3]})  # LLaMA-Factory api
    assert json.loads(factory.text)["scores"] == pytest.approx(expected[:3], abs=1e-5)


def test_metadata_needs_the_token_when_one_is_set(deployed):
    """/metadata names the model's source path and run: behind the token like the scoring routes (was open)."""
    import requests

    url, _, _ = deployed
    assert requests.get(f"{url}/metadata", timeout=30).status_code == 401
    reply = requests.get(f"{url}/metadata", headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert reply.status_code == 200 and reply.json()["max_length"] > 0
    assert requests.get(f"{url}/health", timeout=30).status_code == 200  # probes need no token


def test_bodies_the_parser_cannot_take_get_a_4xx_before_they_are_read_whole(deployed):
    """Over-nested JSON was a 500; a body over serve.max_body_bytes was read whole before any limit applied."""
    import requests

    url, _, _ = deployed
    nested = requests.post(f"{url}/get_reward", data=b"[" * 100_000, timeout=60,
                           headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
    assert nested.status_code == 400, nested.text
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer s3cret\r\nContent-Length: 1000000000\r\n\r\n{\"query\": [")
        assert conn.recv(200).startswith(b"HTTP/1.1 413")


def test_a_full_queue_answers_503_with_retry_after_and_the_rest_are_served(deployed):
    url, _, service = deployed
    queries = rollout(service, 300)
    results: list = []

    def one() -> None:
        reply = post(f"{url}/get_reward", {"query": queries})
        results.append((reply.status_code, reply.headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(90)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [code for code, _ in results]
    assert set(codes) == {200, 503}, codes  # some served, the overflow refused: no 500, no hang
    assert {after for code, after in results if code == 503} == {"1"}
    assert post(f"{url}/get_reward", {"query": queries[:2]}).status_code == 200  # and it still serves


def test_serving_where_serve_already_listens_elsewhere_is_a_clear_error(deployed):
    _, cfg, _ = deployed
    with pytest.raises(serving.ServeRunningElsewhere, match="already runs on this cluster at http://127.0.0.1:"):
        serving.start(cfg, port=free_port())


def test_stop_deletes_only_its_own_app(deployed):
    """On a shared cluster ``stop`` must not take other Serve applications down (it called serve.shutdown())."""
    from ray import serve

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    class Other:
        def __call__(self, request) -> str:
            return "other"

    serve.run(Other.bind(), name="someone-else", route_prefix="/someone-else")
    try:
        _, cfg, _ = deployed
        serving.stop()
        apps = serve.status().applications
        assert "someone-else" in apps and serving.APP_NAME not in apps
    finally:
        serving.start(cfg)  # the module's endpoint, back for any test after this one
        serve.delete("someone-else")


def test_registry_uris_latest_alias_and_number(tmp_path, monkeypatch):
    """``models:/name/latest`` is the highest version (it was passed on as a version number and failed)."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    folder = chat_styles.reward_model_folder("chatml", tmp_path / "rm")
    client.create_registered_model("rm")
    for _ in range(3):
        client.create_model_version("rm", source=folder, run_id=None)
    client.set_registered_model_alias("rm", "champion", "2")
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"tracking.tracking_uri={uri}"])
    versions = {spec: serving.resolve_model(cfg, spec)[1]["version"]
                for spec in ("models:/rm/latest", "models:/rm@champion", "models:/rm/1")}
    assert versions == {"models:/rm/latest": "3", "models:/rm@champion": "2", "models:/rm/1": "1"}
    with pytest.raises(FileNotFoundError, match="models:/<name>/latest"):
        serving.resolve_model(cfg, "models:/rm/newest")


def ray_processes(tmp: Path) -> list[str]:
    # -ww: whole command lines whatever COLUMNS says (pytest's terminal width would cut them before the path)
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], check=True, capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if str(tmp) in line and "ps -ww" not in line]


def test_sigterm_stops_serve_like_ctrl_c_and_leaves_no_ray_process(tmp_path):
    """What Slurm, systemd and Kubernetes send first. The Ray it started (its own temp folder, so its processes are
    told apart from the suite's) must be gone, the dashboard and runtime-env agents included."""
    folder = chat_styles.reward_model_folder("llama3", tmp_path / "rm")
    ray_tmp = Path("/tmp") / f"nbt{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "run_pipeline.py"), "serve", "--model", folder, "--port", str(free_port()),
           "--config", str(REPO / "configs" / "smoke.yaml"), "serve.token_env=''"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines = []
        deadline = time.time() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving at"):
                break
            assert time.time() < deadline, "".join(lines[-30:])
        assert proc.poll() is None and ray_processes(ray_tmp), "".join(lines[-30:])
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert rc == 143 and time.time() - start < 60
        deadline = time.time() + 20
        while ray_processes(ray_tmp) and time.time() < deadline:
            time.sleep(0.5)
        assert ray_processes(ray_tmp) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for line in ray_processes(ray_tmp):
            os.kill(int(line.split()[0]), signal.SIGKILL)
