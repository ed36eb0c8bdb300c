"""The load benchmark as a test: 20 annotator clients over real HTTP on loopback store exactly 1,000 judgments."""

import importlib.util

from .conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_collect", REPO / "benchmarks" / "bench_collect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_twenty_clients_store_exactly_one_thousand(tmp_path):
    result = load_benchmark().run_benchmark(clients=20, judgments=1000, overlap=2, timeout_s=240,
                                            workdir=str(tmp_path))
    assert result["judgments_stored"] == result["judgments_acknowledged"] == 1000
    assert result["duplicates"] == 0 and result["max_per_pair"] <= 2
    print(f"submit p50 {result['submit_p50_ms']} ms, p95 {result['submit_p95_ms']} ms")
