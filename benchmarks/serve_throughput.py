"""The reward endpoint under load, against a naive server with the same model, on loopback only.

    python benchmarks/serve_throughput.py [--clients 32] [--requests 10] [--rounds 2] [--model embedded:minilm]

Both servers are Ray Serve deployments with one replica and the same CPUs, serving the same exported model:

* ``batched``: the project's endpoint (:mod:`pipeline.serving`): requests from all callers batched under a token
  budget, sorted by length, fp32 head;
* ``naive``: one forward per request (``model(**tokenizer(texts, padding=True))``), no batching across callers.

``--clients`` threads each send ``--requests`` ``POST /get_reward`` requests of one text (real prompt/response
pairs from ``../shared/data`` HH-RLHF, rendered as the model's conversation text; a fixed list, the same for both
servers), as fast as answers come back, while one more thread asks ``GET /health`` every 100 ms. Printed per server
and round: requests/s, texts/s, p50 and p99 latency, ``/health``'s p50 and max latency under that load, and the ratio
batched/naive of requests/s measured in the same run (the servers alternate each round). Every request is bounded (a
timeout) and the loop stops by itself; nothing leaves 127.0.0.1.
"""

# no "from __future__ import annotations": FastAPI reads the naive route's annotations (pickled by Ray Serve)
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def naive_app(folder: str, cpus: float):
    """One request, one forward: the baseline."""
    import torch
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": cpus})
    @serve.ingress(app)
    class Naive:
        def __init__(self) -> None:
            from pipeline import modeling

            self.model, self.tok = modeling.load_exported(folder)

        @app.get("/health")
        async def health(self) -> dict:
            return {"status": "ok"}

        @app.post("/get_reward")
        async def get_reward(self, body: dict) -> dict:
            batch = self.tok(body["query"], padding=True, truncation=True, max_length=512, return_tensors="pt",
                             return_token_type_ids=False)
            with torch.inference_mode():
                return {"rewards": self.model(**batch).logits[:, 0].tolist()}

    return Naive.bind()


def load(url: str, texts: list[str], clients: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(requests):
            body = json.dumps({"query": [texts[(k * requests + j) % len(texts)]]}).encode()
            started = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(f"{url}/get_reward", data=body, headers={
                    "Content-Type": "application/json"}), timeout=120) as reply:
                reply.read()
            with lock:
                latencies.append(time.perf_counter() - started)

    health: list[float] = []
    done = threading.Event()

    def probe() -> None:  # /health under load: a liveness probe must not wait behind the scoring
        while not done.wait(0.1):
            started = time.perf_counter()
            with urllib.request.urlopen(f"{url}/health", timeout=30) as reply:
                reply.read()
            health.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    prober = threading.Thread(target=probe)
    started = time.perf_counter()
    prober.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done.set()
    prober.join()
    latencies.sort()
    return {"requests_per_s": len(latencies) / wall, "texts_per_s": len(latencies) / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[int(0.99 * (len(latencies) - 1))],
            "health_p50_s": statistics.median(health) if health else float("nan"),
            "health_max_s": max(health, default=float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="embedded:minilm")
    args = parser.parse_args()
    from ray import serve

    from pipeline import formats, modeling, serving
    from pipeline.config import load_config
    from pipeline.raycluster import ensure_ray

    shared = Path(os.environ.get("NORMBT_SHARED_DATA", REPO.parent / "shared" / "data"))
    tok = modeling.load_tokenizer(args.model)
    records, _ = formats.normalise_file_bytes((shared / "hh_rlhf/helpful_train_sample.jsonl").read_bytes(),
                                              "helpful", source="hh")
    texts = [tok.decode(modeling.encode_messages(tok, r["prompt"] + r["chosen"])[:256], skip_special_tokens=True)
             for r in records[:200]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(modeling.save_reward_model(modeling.build_reward_model(args.model, tok), tok, Path(tmp) / "rm"))
        cfg = load_config(None, [f"serve.model={folder}", "serve.port=8765", "rewardbench.max_length=512"])
        ensure_ray(cfg)
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "?")
        print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.clients} clients x {args.requests} requests of one text")
        ratios = []
        for round_ in range(args.rounds):
            results = {}
            for name in ("naive", "batched"):
                if name == "batched":
                    url = serving.start(cfg)
                else:
                    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
                    serve.run(naive_app(folder, cfg.serve.cpus_per_replica), name="naive", route_prefix="/")
                    url = "http://127.0.0.1:8765"
                    serving.wait_until_healthy(url, None)
                load(url, texts[:8], 4, 2)  # warm-up
                results[name] = load(url, texts, args.clients, args.requests)
                serving.stop() if name == "batched" else serve.delete("naive")
                r = results[name]
                print(f"round {round_ + 1} {name:8s}: {r['requests_per_s']:6.1f} requests/s, "
                      f"{r['texts_per_s']:6.1f} texts/s, p50 {r['p50_s'] * 1000:7.1f} ms, p99 {r['p99_s'] * 1000:7.1f} ms, "
                      f"/health p50 {r['health_p50_s'] * 1000:6.1f} ms, max {r['health_max_s'] * 1000:6.1f} ms")
            ratios.append(results["batched"]["requests_per_s"] / results["naive"]["requests_per_s"])
            print(f"round {round_ + 1} ratio batched/naive requests/s: {ratios[-1]:.2f}x")
        print(f"ratios: {', '.join(f'{r:.2f}' for r in ratios)} (target >= 3x at 32 clients)")


if __name__ == "__main__":
    main()
