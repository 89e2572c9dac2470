"""An existing Ray cluster, as the README tells users to use one.

1. The README's cluster commands, read from its ``cluster-commands`` block and run as written, with loopback for
   ``<head-ip>``, free ports for 6379 / 8265 and a temporary folder for the shared storage: a head started with
   ``ray start --head --block`` (and a free port for its dashboard agent: the suite's own Ray holds the default) in
   the background (stopped by its own process id), the smoke pipeline run with
   ``RAY_ADDRESS``, then the same command submitted with ``ray job submit`` on the same shared run directory with
   the register stage's manifest removed: the job skips what is done and registers again (a whole second
   pipeline would double the test's time and check nothing the first run does not). Step 2 (another node) needs another machine.
2. Two nodes with ``ray.cluster_utils.Cluster`` (in a subprocess, which owns that cluster), one training worker
   on each (``train.placement_strategy=STRICT_SPREAD``; checked with the State API), storage given as a
   ``file://`` URI standing in for shared storage; the worker on the first node is killed (SIGKILL) once the
   controller has recorded a checkpoint: the run restarts its worker group from that checkpoint and finishes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_commands() -> list[str]:
    """The command lines of the README's ``cluster-commands`` block, in order (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- cluster-commands:.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no cluster-commands block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def _run(line: str, env: dict[str, str], log: Path, timeout: float) -> None:
    words = shlex.split(line)
    assignments = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value prefixes, as a shell reads them
        key, _, value = words.pop(0).partition("=")
        assignments[key] = value
    for _ in range(3):
        with open(log, "wb") as out:
            done = subprocess.run(words, cwd=REPO, env={**env, **assignments}, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False)
        # The job server refuses a submission while the head's job agent is not (or no longer) registered, and
        # says to try again: a user would, so the test does (only for that message, at most twice more).
        if done.returncode == 0 or "No available agent to submit job" not in log.read_text():
            break
        time.sleep(10)
    assert done.returncode == 0, f"{line}\n{log.read_text()[-4000:]}"


@pytest.fixture
def readme_head(tmp_path):
    """Step 1 of the README with --block, in its own process group; yields the substitutions for the other steps."""
    commands = readme_commands()
    assert commands[0].startswith("ray start --head") and commands[1].startswith("ray start --address")
    port, dashboard = _free_port(), _free_port()
    values = {"<head-ip>": "127.0.0.1", "6379": str(port), "8265": str(dashboard),
              "<shared-folder>": str(tmp_path / "shared"), "<shared-uri>": f"file://{tmp_path / 'shared'}"}

    def fill(line: str) -> str:
        for key, value in values.items():
            line = line.replace(key, value)
        return line

    log = open(tmp_path / "head.log", "wb")
    # Every Ray node's dashboard agent listens on 52365 unless told otherwise, and this machine already runs the
    # suite's own local Ray: a head left on 52365 lost the port, so its job agent never registered and every
    # submission got "No available agent to submit job". A real head machine runs one Ray; here it gets a free port.
    agent = ["--dashboard-agent-listen-port", str(_free_port())]
    head = subprocess.Popen([*shlex.split(fill(commands[0])), *agent, "--block"], cwd=tmp_path, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not _dashboard_up(dashboard):
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head's dashboard did not come up in 120 s"
            time.sleep(1)
        yield fill, commands
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


def _dashboard_up(port: int) -> bool:
    """The dashboard answers (401 counts: Ray 2.60 enables token authentication by default)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2) as reply:
            return reply.status == 200
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def test_readme_cluster_commands_run_the_smoke_pipeline_with_ray_address_and_as_a_job(readme_head, tmp_path):
    fill, commands = readme_head
    by_address, by_job = commands[2], commands[3]
    assert by_address.startswith("RAY_ADDRESS=") and "ray job submit" in by_job
    _run(fill(by_address), _env(), tmp_path / "address.log", timeout=900)
    run = tmp_path / "shared" / "runs" / "smoke"
    register = json.loads((run / "register" / "manifest.json").read_text())
    assert register["outputs"]["model_uri"] and (run / "train" / "model" / "model.safetensors").is_file()
    assert "joined" in (tmp_path / "address.log").read_text()  # the driver said which cluster it used

    # the same command as a job: the run directory is shared, so the job finds every stage done but the one whose
    # manifest is removed here (register: MLflow from inside the job), runs that one and skips the rest
    (run / "register" / "manifest.json").unlink()
    _run(fill(by_job), _env(), tmp_path / "job.log", timeout=900)
    job_log = (tmp_path / "job.log").read_text()
    assert (run / "register" / "manifest.json").is_file(), job_log[-3000:]
    assert "succeeded" in job_log
    assert re.search(r"register: running", job_log) and re.search(r"train: .*skip", job_log), job_log[-3000:]


TWO_NODES = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    from pathlib import Path
    from ray.cluster_utils import Cluster

    root = Path(sys.argv[1])
    sys.path.insert(0, os.getcwd())  # the repository (the test runs this script from it)
    # the driver's node runs no work; its dashboard serves the State API (Ray Train's clean-up and this test use it)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_port": int(sys.argv[2]),
                                                            "dashboard_agent_listen_port": int(sys.argv[3])})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    import run_pipeline

    storage = root / "storage"
    removed = {}

    def registered_checkpoints():  # the controller has recorded one (a folder alone may still be uploading)
        for snapshot in storage.glob("train-*/checkpoint_manager_snapshot.json"):
            try:
                return json.loads(snapshot.read_text()).get("checkpoint_results")
            except ValueError:
                return None
        return None

    def kill_the_worker_on_the_first_node():  # after the first checkpoint of the Train run lands in storage
        try:
            kill_when_checkpointed()
        except Exception as err:  # noqa: BLE001 - reported in the result line
            removed["error"] = repr(err)

    def kill_when_checkpointed():
        from ray.util.state import list_actors

        deadline = time.time() + 600
        while time.time() < deadline:
            if registered_checkpoints():
                workers = list_actors(address=cluster.address, detail=True, filters=[
                    ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                placed = sorted(w.node_id for w in workers)
                victim = next(w for w in workers if w.node_id == nodes[0].node_id)
                os.kill(victim.pid, signal.SIGKILL)
                removed["placed"] = placed
                return
            time.sleep(0.5)

    threading.Thread(target=kill_the_worker_on_the_first_node, daemon=True).start()
    code = run_pipeline.main(["--config", "configs/smoke.yaml", "--stages", "data,train", f"run.root={root}",
                              f"ray.storage_path=file://{storage}", "train.placement_strategy=STRICT_SPREAD",
                              "train.cpus_per_worker=0.5", "train.max_steps=12", "train.checkpoint_every=3",
                              "train.max_failures=2", "tracking.enabled=false"])
    distinct = len(set(removed.get("placed", []))) == 2 and set(removed["placed"]) <= {n.node_id for n in nodes}
    print(json.dumps({"code": code, "killed": "placed" in removed, "one_worker_per_node": distinct,
                      **({"error": removed["error"]} if "error" in removed else {})}))
    cluster.shutdown()
""")


@pytest.mark.slow  # 2 min on 2 cores
def test_two_nodes_one_worker_each_survive_losing_a_node(tmp_path):
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES)
    log = tmp_path / "two_nodes.log"
    with open(log, "wb") as out:
        # a free port for the head's dashboard agent too: the suite's local Ray holds the default 52365
        done = subprocess.run([sys.executable, str(script), str(tmp_path), str(_free_port()), str(_free_port())],
                              cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False)
    text = log.read_text()
    assert done.returncode == 0, text[-4000:]
    result = json.loads(text.strip().splitlines()[-1])
    assert result == {"code": 0, "killed": True, "one_worker_per_node": True}, text[-4000:]
    assert "resumed from the checkpoint at step " in text, "the new worker group continues from the checkpoint"
    final = json.loads((tmp_path / "smoke" / "train" / "metrics.json").read_text())["final"]
    assert final["step"] == 12


def test_an_actor_asking_the_state_api_finds_the_cluster_ensure_ray_started(ray_session):
    """Ray Train's placement-group cleaner (the actor that releases a stopped trial's CPUs) asks the State API, from
    inside the cluster, whether the train controller is alive. For a cluster ``ray.init`` started, Ray looked the
    cluster up in /tmp/ray/ray_current_cluster, which only ``ray start`` writes: another cluster, or none, so the
    question timed out after 40 s (a traceback on every fresh run's terminal) or failed at once."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Asker:
        def state_of(self, actor_id: str) -> str | None:
            from ray.util.state import get_actor

            for attempt in range(3):  # a loaded 2-core machine may answer slowly; a wrong cluster never answers
                try:
                    found = get_actor(actor_id, timeout=10)
                    return found.state if found else None
                except Exception:  # noqa: BLE001  (the last attempt's error is raised)
                    if attempt == 2:
                        raise
            return None

    asker = Asker.remote()
    assert ray.get(asker.state_of.remote(asker._actor_id.hex()), timeout=120) == "ALIVE"
