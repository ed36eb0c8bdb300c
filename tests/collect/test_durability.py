"""A server killed with SIGKILL while annotators submit has lost no acknowledged judgment after a restart."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import yaml

from rlhf.collect.storage import Store

from .conftest import REPO, _free_port, write_pairs


def start_server(config_path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf.collect.cli", "serve", "--config", str(config_path), f"server.port={port}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    return proc


def wait_ready(url: str, token: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/guidelines", headers={"Authorization": f"Bearer {token}"}, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not come up")


def test_sigkill_loses_no_acknowledged_judgment(tmp_path, any_url):
    config = {
        "output_dir": str(tmp_path / "collect"),
        "database": any_url,
        "pairs": {"file": str(write_pairs(tmp_path / "pairs.jsonl", 150)), "ready_ahead": 1000},
        "assignment": {"overlap": 2, "gold_rate": 0.0},
    }
    config_path = tmp_path / "collect.yaml"
    config_path.write_text(yaml.safe_dump(config))
    store = Store.open(any_url)
    tokens = [store.add_annotator(f"p{i}") for i in range(6)]
    store.close()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(config_path, port)
    wait_ready(url, tokens[0], proc)

    acknowledged: dict[int, tuple[str, str]] = {}  # judgment id -> (token, choice)
    lock = threading.Lock()
    kill_after = 80

    def annotate(token: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
            try:
                while True:
                    item = client.get("/api/next").json()["assignment"]
                    if item is None:
                        return
                    reply = client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"})
                    if reply.status_code == 201:
                        with lock:
                            acknowledged[reply.json()["judgment_id"]] = (token, item["id"])
            except httpx.TransportError:
                return  # the server died under us; everything acknowledged so far must survive

    threads = [threading.Thread(target=annotate, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    while len(acknowledged) < kill_after:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
    proc.wait(10)
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= kill_after

    proc = start_server(config_path, port)
    try:
        wait_ready(url, tokens[0], proc)
        store = Store.open(any_url)
        stored = {r["id"]: r for r in store.judgment_rows()}
        missing = set(acknowledged) - set(stored)
        assert not missing, f"{len(missing)} acknowledged judgments lost"
        store.close()
        # The restarted server keeps working: the next judgment is accepted.
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=10)
        item = client.get("/api/next").json()["assignment"]
        assert client.post("/api/judgments", json={"assignment_id": item["id"], "choice": "left"}).status_code in (200, 201)
    finally:
        proc.terminate()
        proc.wait(20)
