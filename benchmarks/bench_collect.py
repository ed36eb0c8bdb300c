"""Load benchmark of the preference-collection app: concurrent annotator clients over real HTTP on loopback.

Starts `rlhf collect serve` as its own process (SQLite in WAL mode in a temp dir, fixed pairs, no model), then
`--clients` threads, each one annotator with its own token, fetch a pair and submit a judgment until `--judgments`
judgments are acknowledged in all. Afterwards it checks the database: exactly that many judgments, no
(pair, annotator) twice, no pair over its overlap. Prints p50/p95 latency of fetching a pair and of submitting a
judgment. Bounded: a fixed number of judgments, and `--timeout` seconds for the whole run; 127.0.0.1 only.
Before the load, one client alone sends `KEEPALIVE_REQUESTS` requests on one keep-alive connection and the
median of all but the first is reported (`keepalive_p50_ms`): with Nagle's algorithm on the server's connections
each waited for the client's delayed ACK (~40 ms on Linux).

`--stage N [N ...]` times the collect *step* instead (what the `collect` pipeline stage does after sampling: simulated
annotators judge over HTTP until N judgments, then export and statistics), with the pipeline config's assignment
settings (configs/collect/pipeline.yaml: overlap 1, 8 annotators, 224 pairs ready ahead, world-margin gold items)
on a fixed pair file instead of the policy, so the time is the app's own. It prints each size's time and the ratio
of the last size's time to the first's next to the ratio of the sizes: equal ratios = linear.

    python benchmarks/bench_collect.py                     # 20 clients, 1000 judgments (the recorded setting)
    python benchmarks/bench_collect.py --database postgresql+psycopg://...   # against PostgreSQL instead
    python benchmarks/bench_collect.py --stage 2000 6000   # the collect step at two sizes (scaling)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf.collect.storage import Store  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def write_pairs(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"<add> {a}+{b}= #{i}", "response_a": f" {a + b}",
                                "response_b": f" {a + b + 1}", "source_a": "x", "source_b": "y"}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEEPALIVE_REQUESTS = 50


def keepalive_latency_ms(base: str, token: str) -> float:
    """Median latency of requests after the first on one keep-alive connection, one client alone."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        times = []
        for _ in range(KEEPALIVE_REQUESTS):
            t0 = time.perf_counter()
            client.get("/guidelines").raise_for_status()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


def run_benchmark(clients: int = 20, judgments: int = 1000, overlap: int = 2, timeout_s: float = 300,
                  database: str | None = None, workdir: str | None = None) -> dict:
    """Run the load test; returns latencies and the database check. Raises on a failed check or timeout."""
    tmp = Path(workdir or tempfile.mkdtemp(prefix="bench-collect-"))
    url_db = database or f"sqlite:///{tmp / 'collect.db'}"
    pairs_file = tmp / "pairs.jsonl"
    write_pairs(pairs_file, judgments // overlap + clients)  # enough pairs that nobody runs dry
    config = {"output_dir": str(tmp), "database": url_db,
              "pairs": {"file": str(pairs_file), "ready_ahead": judgments},
              "assignment": {"overlap": overlap, "gold_rate": 0.0}}
    (tmp / "collect.yaml").write_text(yaml.safe_dump(config))
    store = Store.open(url_db)
    tokens = [store.add_annotator(f"bench-{i}") for i in range(clients)]
    already = store.count_judgments()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "rlhf.collect.cli", "serve", "--config", str(tmp / "collect.yaml"),
         f"server.port={port}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {server.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            try:
                httpx.get(f"{base}/guidelines", headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)

        keepalive_ms = keepalive_latency_ms(base, tokens[0])
        budget = [judgments]
        lock = threading.Lock()
        next_ms: list[float] = []
        submit_ms: list[float] = []
        acked: list[int] = []
        errors: list[str] = []

        def annotator(token: str) -> None:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                while time.monotonic() < deadline and not errors:
                    with lock:
                        if budget[0] <= 0:
                            return
                        budget[0] -= 1
                    t0 = time.perf_counter()
                    item = client.get("/api/next").json()["assignment"]
                    t1 = time.perf_counter()
                    if item is None:
                        errors.append("a client ran out of pairs")
                        return
                    reply = client.post("/api/judgments", json={"assignment_id": item["id"],
                                                                 "choice": random.choice(["left", "right", "tie"])})
                    t2 = time.perf_counter()
                    if reply.status_code != 201:
                        errors.append(f"submit answered {reply.status_code}: {reply.text[:200]}")
                        return
                    with lock:
                        next_ms.append(1000 * (t1 - t0))
                        submit_ms.append(1000 * (t2 - t1))
                        acked.append(reply.json()["judgment_id"])

        started = time.perf_counter()
        threads = [threading.Thread(target=annotator, args=(t,)) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 10)
        wall = time.perf_counter() - started
        if errors:
            raise RuntimeError(errors[0])
        if len(acked) != judgments:
            raise TimeoutError(f"only {len(acked)} of {judgments} judgments acknowledged within {timeout_s}s")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()

    rows = store.judgment_rows()[already:]
    keys = [(r["pair_id"], r["annotator"]) for r in rows]
    per_pair: dict[int, int] = {}
    for pair_id, _ in keys:
        per_pair[pair_id] = per_pair.get(pair_id, 0) + 1
    store.close()
    result = {
        "clients": clients,
        "judgments_acknowledged": len(acked),
        "judgments_stored": len(rows),
        "duplicates": len(keys) - len(set(keys)),
        "max_per_pair": max(per_pair.values()),
        "acknowledged_ids_unique": len(set(acked)) == len(acked),
        "wall_s": round(wall, 2),
        "judgments_per_s": round(len(acked) / wall, 1),
        "next_p50_ms": round(percentile(next_ms, 50), 1),
        "next_p95_ms": round(percentile(next_ms, 95), 1),
        "submit_p50_ms": round(percentile(submit_ms, 50), 1),
        "submit_p95_ms": round(percentile(submit_ms, 95), 1),
        "submit_mean_ms": round(statistics.mean(submit_ms), 1),
        "keepalive_p50_ms": round(keepalive_ms, 2),
        "database": url_db.split(":", 1)[0],
    }
    ok = (result["judgments_stored"] == judgments and result["duplicates"] == 0
          and result["max_per_pair"] <= overlap and result["acknowledged_ids_unique"])
    if not ok:
        raise AssertionError(f"database check failed: {result}")
    return result


def write_task_pairs(path: Path, n: int) -> None:
    """Addition pairs with the `task`/`meta` the simulated annotators score with: a right and a wrong sum."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99) + 100 * i
            good, bad = f" {a + b}", f" {a + b + rng.choice([-11, -1, 1, 10])}"
            first = rng.random() < 0.5
            f.write(json.dumps({"prompt": f"<add> {a}+{b}=", "response_a": good if first else bad,
                                "response_b": bad if first else good, "source_a": "good" if first else "bad",
                                "source_b": "bad" if first else "good", "task": "add",
                                "meta": {"a": a, "b": b, "answer": a + b, "format": "direct"}}) + "\n")


def run_stage_benchmark(judgments: int, annotators: int = 8, workdir: str | None = None) -> dict:
    """Time the collect step (simulate over HTTP, export, statistics) for `judgments` judgments; see the docstring."""
    from rlhf.collect.export import export
    from rlhf.collect.report import summarize
    from rlhf.collect.settings import CollectConfig
    from rlhf.collect.simulate import simulate
    from rlhf.config import validate

    tmp = Path(workdir or tempfile.mkdtemp(prefix="bench-collect-stage-"))
    pairs_file = tmp / "pairs.jsonl"
    write_task_pairs(pairs_file, judgments + 500)
    cfg = validate(CollectConfig, {
        "output_dir": str(tmp), "pairs": {"file": str(pairs_file), "ready_ahead": 224},
        "assignment": {"overlap": 1, "gold_rate": 0.02, "lease_seconds": 300},
        "gold": {"world_margin": 0.5, "max_items": 20},
        "simulate": {"annotators": annotators, "judgments": judgments, "temperature": 0.2, "timeout_s": 1800},
        "export": {"ties": "keep", "bootstrap": 200},
    }, "bench")
    store = Store.open(cfg.database_url())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = simulate(cfg, store, log=lambda _message: None)
    wall1 = time.perf_counter()
    summary = export(store, tmp / "preferences", cfg.export)
    wall2 = time.perf_counter()
    stats = summarize(store.judgment_rows(), cfg.assignment.overlap, store.pair_counts(),
                      bootstrap=cfg.export.bootstrap, seed=cfg.seed)
    wall3 = time.perf_counter()
    store.close()
    if stats["judgments"] != judgments or result.stopped_because != "target reached":
        raise AssertionError(f"stored {stats['judgments']} of {judgments} judgments ({result.stopped_because})")
    return {"judgments": judgments, "simulate_s": round(wall1 - wall0, 2), "export_s": round(wall2 - wall1, 2),
            "stats_s": round(wall3 - wall2, 2), "total_s": round(wall3 - wall0, 2),
            "cpu_s": round(time.process_time() - cpu0, 2), "exported_rows": summary["rows"]}


def stage_main(sizes: list[int]) -> int:
    import datasets  # noqa: F401 - imported before timing (the first export would pay for it)
    import rlhf.world  # noqa: F401 - the simulated annotators' scorer, likewise

    run_stage_benchmark(100)  # warm-up: imports, first connections, caches
    results = []
    for n in sizes:
        results.append(run_stage_benchmark(n))
        print(json.dumps(results[-1]), flush=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"time({last['judgments']})/time({first['judgments']}) = {last['total_s'] / first['total_s']:.2f} wall, "
              f"{last['cpu_s'] / first['cpu_s']:.2f} CPU-s, for {last['judgments'] / first['judgments']:.2f}x the judgments")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--judgments", type=int, default=1000)
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole run")
    parser.add_argument("--database", help="SQLAlchemy URL (default: SQLite in a temp dir)")
    parser.add_argument("--stage", type=int, nargs="+", metavar="N",
                        help="time the collect step (simulate + export + stats) at these judgment counts instead")
    args = parser.parse_args()
    if args.stage:
        return stage_main(args.stage)
    result = run_benchmark(args.clients, args.judgments, args.overlap, args.timeout, args.database)
    print(json.dumps(result, indent=2))
    print(f"{result['clients']} clients stored {result['judgments_stored']} judgments ({result['duplicates']} duplicates) "
          f"in {result['wall_s']} s; submit p50 {result['submit_p50_ms']} ms, p95 {result['submit_p95_ms']} ms; "
          f"next-pair p50 {result['next_p50_ms']} ms, p95 {result['next_p95_ms']} ms; one keep-alive client alone "
          f"{result['keepalive_p50_ms']} ms per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
