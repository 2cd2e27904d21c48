"""Rank-safe fetching (issue 14): the CORE bundle and HF datasets are fetched by one rank per node
under a file lock, and every rank leaves with the same outcome (runtime.fetch_once).

Real processes: 2 ranks (gloo on CPU), each a fresh `spawn`ed interpreter, against a bundle zip
served by an http.server in a thread of the test that counts GET requests. Every spawn runs under
a wall-clock limit, so a deadlock (one rank in a collective the other skipped) fails the test
instead of hanging CI; the process group's own timeout is short for the same reason.
"""
import contextlib
import http.server
import json
import multiprocessing
import os
import pickle
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from filelock import FileLock
from test_core import ByteTokenizer, FactModel, facts, write_bundle, zip_bundle

from nanopipe.eval.core import EvalBundleUnavailable, core_or_unavailable, evaluate_core
from nanopipe.runtime import Device, FetchFailed, _portable, fetch_once

MAX_PER_TASK = 3
PG_TIMEOUT_S = 30  # a rank stuck in a collective errors out after this (gloo), well inside SPAWN_LIMIT_S
SPAWN_LIMIT_S = 120  # the whole 2-process run, start-up included; beyond it the test fails as a deadlock
SLOW_GET_S = 0.5  # every response waits this long, so that two ranks fetching at once really overlap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# The harness: N ranks in spawned processes, each running one scenario function of this module

def _rank_main(rank, world, port, local_rank, scenario, kwargs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
        t0 = time.time()
        try:
            result = {"value": globals()[scenario](rank=rank, local_rank=local_rank, world=world, **kwargs)}
        except Exception as e:
            result = {"error_type": type(e).__name__, "error": str(e)}
        result["seconds"] = time.time() - t0
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(tmp_path, scenario, local_ranks, per_rank=None, **kwargs):
    """Run `scenario` on len(local_ranks) ranks (rank r has LOCAL_RANK local_ranks[r]; per_rank[r]
    adds keyword arguments); return ([each rank's result], wall seconds). Fails on a hang or a crash."""
    world, port = len(local_ranks), free_port()
    out_dir = tmp_path / f"out-{scenario}-{time.time_ns()}"
    out_dir.mkdir()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, local_ranks[r], scenario,
                                                  {**kwargs, **(per_rank[r] if per_rank else {})}, str(out_dir)))
             for r in range(world)]
    t0 = time.time()
    for p in procs:
        p.start()
    deadline = t0 + SPAWN_LIMIT_S
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    wall = time.time() - t0
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {SPAWN_LIMIT_S} s: deadlock"
    assert [p.exitcode for p in procs] == [0] * world, f"exit codes {[p.exitcode for p in procs]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)], wall


# ---------------------------------------------------------------------------
# The bundle server: serves one zip (or fails), counting GET requests

class BundleServer:
    def __init__(self, body: bytes):
        self.body, self.gets, self.fail_first = body, 0, 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server._lock:
                    server.gets += 1
                    fail = server.gets <= server.fail_first
                time.sleep(SLOW_GET_S)
                if fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def do_HEAD(self):  # fsspec may ask for the size first; not a download, not counted
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def bundle_dir(tmp_path):
    return write_bundle(tmp_path / "source_bundle")


@pytest.fixture
def server(bundle_dir, tmp_path):
    s = BundleServer(zip_bundle(bundle_dir, tmp_path / "eval_bundle.zip").read_bytes())
    yield s
    s.close()


def expected_core(bundle_dir):
    return evaluate_core(FactModel(facts()), ByteTokenizer(), "cpu", bundle_dir, max_per_task=MAX_PER_TASK)["core_metric"]


# ---------------------------------------------------------------------------
# Scenarios (run inside the ranks)

def core_scenario(rank, local_rank, world, url, cache):
    dev = Device(True, rank, local_rank, world, torch.device("cpu"), torch.float32, float("inf"))
    out = core_or_unavailable(FactModel(facts()), ByteTokenizer(), dev, url, cache, MAX_PER_TASK)
    return {k: out[k] for k in ("core_metric", "core_unavailable") if k in out}


def fetch_once_scenario(rank, local_rank, world, tmp, fail_on):
    """fn raises on rank `fail_on` only (or returns its rank): report what each rank saw."""
    calls = []

    def fn():
        calls.append(rank)
        if fail_on == "unpicklable" and rank == 1:
            raise ValueError(threading.Lock())  # a lock in args: cannot be pickled
        if rank == fail_on:
            raise EvalBundleUnavailable("http://x/b.zip", f"refused on rank {rank}")
        return rank

    try:
        return {"value": fetch_once(fn, Path(tmp) / "x.lock", lock_timeout_s=1), "calls": calls}
    except Exception as e:
        return {"error_type": type(e).__name__, "error": str(e), "calls": calls}


def hf_scenario(rank, local_rank, world, dataset_dir, cache_dir, log):
    """load_hf_dataset on every rank, of a dataset with a local copy and of one without; each call of
    the real loader is logged (which, start, end) to `log`."""
    from nanopipe.tasks import common
    real = common._load_hf_dataset

    def logged(hub_path, *args, **kwargs):
        start = time.time()
        time.sleep(SLOW_GET_S)  # a slow download: concurrent loads would overlap
        try:
            return real(hub_path, *args, **kwargs)
        finally:
            with open(log, "a") as f:
                f.write(json.dumps({"hub_path": hub_path, "rank": rank, "start": start, "end": time.time()}) + "\n")

    common._load_hf_dataset = logged
    out = {"rows": [dict(r) for r in common.load_hf_dataset("openai/gsm8k", "main", "test", dataset_dir, cache_dir)]}
    try:
        common.load_hf_dataset("cais/mmlu", "all", "test", dataset_dir, cache_dir)
    except common.DatasetUnavailableError as e:
        out["unavailable"] = str(e)
    return out


# ---------------------------------------------------------------------------
# CORE through core_or_unavailable on 2 ranks

def test_cold_cache_one_download_same_core(tmp_path, server, bundle_dir):
    results, wall = run_ranks(tmp_path, "core_scenario", [0, 1], url=server.url, cache=str(tmp_path / "cache"))
    want = expected_core(bundle_dir)
    assert [r.get("value") for r in results] == [{"core_metric": pytest.approx(want)}] * 2, results
    assert server.gets == 1  # one rank of the node downloaded; the other read its cache
    assert (tmp_path / "cache/eval_bundle/core.yaml").is_file() and wall < 60


@pytest.mark.parametrize("failure", ["http500", "refused"])
def test_unfetchable_bundle_every_rank_unavailable_same_reason(tmp_path, server, failure):
    if failure == "http500":
        # only the first GET fails: were the ranks to fetch on their own, the second would succeed
        # and go on to evaluate, waiting in an all-reduce the first never enters
        server.fail_first = 1
        url = server.url
    else:
        url = f"http://127.0.0.1:{free_port()}/eval_bundle.zip"  # nothing listens: refused at once
    results, wall = run_ranks(tmp_path, "core_scenario", [0, 1], url=url, cache=str(tmp_path / "cache"))
    values = [r.get("value") for r in results]
    assert all(v and v["core_metric"] is None for v in values), results
    reasons = {v["core_unavailable"] for v in values}
    assert len(reasons) == 1 and "cannot fetch" in reasons.pop()
    assert wall < 60
    assert server.gets == (1 if failure == "http500" else 0)  # rank 0 alone tried
    assert not (tmp_path / "cache/eval_bundle").exists()


def test_invalid_bundle_fails_every_rank_with_its_message(tmp_path, server):
    server.body = b"<html>captive portal</html>"
    results, wall = run_ranks(tmp_path, "core_scenario", [0, 1], url=server.url, cache=str(tmp_path / "cache"))
    assert [r.get("error_type") for r in results] == ["EvalBundleInvalid"] * 2, results
    assert results[0]["error"] == results[1]["error"] and "not a zip archive" in results[0]["error"]
    assert server.gets == 1 and wall < 60


@pytest.mark.parametrize("shared_cache", [False, True])
def test_two_nodes_one_download_per_node(tmp_path, server, bundle_dir, shared_cache):
    """Each rank is local rank 0 of its own node. Without a shared filesystem each node downloads into
    its own cache; with one, global rank 0 goes first and the other node finds its bundle."""
    caches = [tmp_path / "cache"] * 2 if shared_cache else [tmp_path / "node0", tmp_path / "node1"]
    results, _ = run_ranks(tmp_path, "core_scenario", [0, 0], per_rank=[{"cache": str(c)} for c in caches],
                           url=server.url)
    want = expected_core(bundle_dir)
    assert [r.get("value") for r in results] == [{"core_metric": pytest.approx(want)}] * 2, results
    assert server.gets == (1 if shared_cache else 2)
    assert all((c / "eval_bundle/core.yaml").is_file() for c in caches)


# ---------------------------------------------------------------------------
# fetch_once itself

@pytest.mark.parametrize("fail_on", [0, 1, "unpicklable", "locked"])
def test_fetch_once_raises_the_same_exception_on_every_rank(tmp_path, fail_on):
    with FileLock(tmp_path / "x.lock") if fail_on == "locked" else contextlib.nullcontext():  # another job's fetch
        results, wall = run_ranks(tmp_path, "fetch_once_scenario", [0, 1], tmp=str(tmp_path), fail_on=fail_on)
    seen = [r["value"] for r in results]
    want_type = {"unpicklable": "FetchFailed", "locked": "TimeoutError"}.get(fail_on, "EvalBundleUnavailable")
    assert [s.get("error_type") for s in seen] == [want_type] * 2, seen
    assert seen[0]["error"] == seen[1]["error"]
    if fail_on == 0:  # rank 0 goes first; when it fails, nobody else tries
        assert [s["calls"] for s in seen] == [[0], []] and "refused on rank 0" in seen[0]["error"]
    elif fail_on == 1:
        assert [s["calls"] for s in seen] == [[0], [1]] and "refused on rank 1" in seen[0]["error"]
    elif fail_on == "unpicklable":
        assert seen[0]["error"].startswith("ValueError: <unlocked _thread.lock")
    else:  # rank 0 gives up on the lock after lock_timeout_s, and so does everyone
        assert [s["calls"] for s in seen] == [[], []] and f"for the lock {tmp_path / 'x.lock'}" in seen[0]["error"]
    assert wall < 60


def test_fetch_once_single_process_is_a_plain_call(tmp_path):
    assert not dist.is_initialized()
    calls = []
    assert fetch_once(lambda: calls.append(1) or "v", tmp_path / "sub/x.lock") == "v" and calls == [1]
    err = EvalBundleUnavailable("u", "r")

    def boom():
        raise err

    with pytest.raises(EvalBundleUnavailable) as e:
        fetch_once(boom, tmp_path / "sub/x.lock")
    assert e.value is err  # the very exception, not a copy
    assert not (tmp_path / "sub").exists()  # no lock taken, nothing written


def test_single_process_core_or_unavailable_unchanged(tmp_path, server, bundle_dir):
    dev = Device(False, 0, 0, 1, torch.device("cpu"), torch.float32, float("inf"))
    refused = f"http://127.0.0.1:{free_port()}/eval_bundle.zip"
    out = core_or_unavailable(FactModel(facts()), ByteTokenizer(), dev, refused, tmp_path / "c1", MAX_PER_TASK)
    assert out["core_metric"] is None and out["core_unavailable"].startswith(f"eval bundle unavailable: cannot fetch {refused}")
    out = core_or_unavailable(FactModel(facts()), ByteTokenizer(), dev, server.url, tmp_path / "c2", MAX_PER_TASK)
    assert out["core_metric"] == pytest.approx(expected_core(bundle_dir)) and server.gets == 1
    assert [p.name for p in (tmp_path / "c2").iterdir()] == ["eval_bundle"]  # no lock file in one process


def test_exceptions_cross_ranks_with_type_and_text():
    e = EvalBundleUnavailable("http://h/b.zip", "ClientConnectorError: refused")
    copy = pickle.loads(pickle.dumps(_portable(e)))
    assert type(copy) is EvalBundleUnavailable and str(copy) == str(e) and (copy.url, copy.reason) == (e.url, e.reason)
    odd = ValueError(threading.Lock())
    assert isinstance(_portable(odd), FetchFailed) and str(_portable(odd)).startswith("ValueError: <unlocked")


# ---------------------------------------------------------------------------
# HF datasets through load_hf_dataset on 2 ranks

GSM8K_TEST = [{"question": "What is 3 + 4?", "answer": "3+4 = <<3+4=7>>7\n#### 7"},
              {"question": "What is 6 * 5?", "answer": "6*5 = <<6*5=30>>30\n#### 30"}]


def test_hf_dataset_loaded_by_local_rank0_first_failure_on_every_rank(tmp_path):
    root = tmp_path / "hf/openai/gsm8k/main"
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM8K_TEST), root / "test-00000-of-00001.parquet")
    log = tmp_path / "loads.jsonl"
    results, wall = run_ranks(tmp_path, "hf_scenario", [0, 1], dataset_dir=str(tmp_path / "hf"),
                              cache_dir=str(tmp_path / "hf_cache"), log=str(log))
    values = [r.get("value") for r in results]
    assert [v and v["rows"] for v in values] == [GSM8K_TEST] * 2, results
    loads = [json.loads(line) for line in log.read_text().splitlines()]
    gsm8k = sorted((x for x in loads if x["hub_path"] == "openai/gsm8k"), key=lambda x: x["start"])
    assert [x["rank"] for x in gsm8k] == [0, 1] and gsm8k[1]["start"] >= gsm8k[0]["end"]  # local rank 0 first
    # no local copy of MMLU: rank 0 alone tries, and both ranks raise its error
    assert [x["rank"] for x in loads if x["hub_path"] == "cais/mmlu"] == [0]
    assert values[0]["unavailable"] == values[1]["unavailable"] and "no local copy" in values[0]["unavailable"]
    assert wall < 60
