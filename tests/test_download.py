"""The download stage: embedded build, and HTTP/file fetches with injected faults."""
import http.server
import threading
from pathlib import Path

import pytest
from helpers import make_cfg

from nanopipe import artifacts
from nanopipe.data import download
from nanopipe.data.shards import read_manifest, split_paths, verify_shard, write_shard
from nanopipe.stage import run_stage
from nanopipe.stages import download as download_stage


def _fixture_shards(root: Path, n: int) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        p = root / f"shard_{i:05d}.parquet"
        write_shard(p, [f"document {i}-{j} " * 20 for j in range(50)], row_group_size=16)
        out[p.name] = p.read_bytes()
    return out


class FaultyServer:
    """Serves fixture shards; `faults[name]` is a list of behaviours consumed per request."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.faults, self.hits = files, {}, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                name = self.path.lstrip("/")
                if name not in outer.files:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.files[name])))
                self.end_headers()

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.hits[name] = outer.hits.get(name, 0) + 1  # GETs only: each is one fetch attempt
                fault = outer.faults.get(name, []).pop(0) if outer.faults.get(name) else None
                if fault == "500":
                    self.send_error(500)
                    return
                if name not in outer.files or fault == "404":
                    self.send_error(404)
                    return
                body = outer.files[name]
                if fault == "truncate":  # a body cut short, with a length header that matches the cut
                    body = body[: len(body) // 2]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    s = FaultyServer(_fixture_shards(tmp_path / "remote", 3))
    yield s
    s.close()


def _url_cfg(template, **extra):
    over = ["data.source=url", f"data.url_template='{template}'", "data.total_shards=3", "data.val_shard=2",
            "data.num_train_shards=2", "data.retries=3", "data.backoff=0.01", "data.workers=2", "tracking.enabled=false"]
    return make_cfg(*over, *[f"{k}={v}" for k, v in extra.items()])


def test_http_download_with_retry_and_truncation(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server.faults = {"shard_00000.parquet": ["500"], "shard_00001.parquet": ["truncate"]}
    run_stage(download_stage, _url_cfg(f"http://127.0.0.1:{server.port}/shard_{{index:05d}}.parquet"))
    m = read_manifest()
    assert [s["name"] for s in m["shards"]] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert m["val_shard"] == "shard_00002.parquet"
    assert server.hits["shard_00000.parquet"] == 2 and server.hits["shard_00001.parquet"] == 2
    for s in m["shards"]:
        p = Path("data/shards") / s["name"]
        assert p.read_bytes() == server.files[s["name"]]
        assert artifacts.sha256_file(p) == s["sha256"] and s["rows"] == 50
    train, val = split_paths(m)
    assert val.name == "shard_00002.parquet" and len(train) == 2
    metrics = artifacts.read_json("metrics/download.json")
    assert metrics["fetched"] == 3 and metrics["skipped"] == 0
    # A rerun skips the shards it already verified.
    server.hits.clear()
    run_stage(download_stage, _url_cfg(f"http://127.0.0.1:{server.port}/shard_{{index:05d}}.parquet"))
    assert server.hits == {} and artifacts.read_json("metrics/download.json")["skipped"] == 3


def test_permanent_404_fails_clearly_and_leaves_nothing(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server.faults = {"shard_00001.parquet": ["404"] * 10}
    url = f"http://127.0.0.1:{server.port}/shard_{{index:05d}}.parquet"
    with pytest.raises(download.DownloadError) as e:
        run_stage(download_stage, _url_cfg(url))
    msg = str(e.value)
    assert f"http://127.0.0.1:{server.port}/shard_00001.parquet" in msg and "HTTP 404" in msg
    assert server.hits["shard_00001.parquet"] == 1  # a 404 is not retried
    leftovers = [p.name for p in Path("data/shards").iterdir() if p.name != ".sources.json"]
    assert "shard_00001.parquet" not in leftovers
    assert not any(".tmp" in n for n in leftovers), leftovers
    assert not Path("metrics/download.json").exists() and not Path("data/shards/manifest.json").exists()


def test_persistent_500_gives_up_after_retries(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server.faults = {"shard_00000.parquet": ["500"] * 10}
    with pytest.raises(download.DownloadError, match="HTTP 500.*after 3 attempts"):
        run_stage(download_stage, _url_cfg(f"http://127.0.0.1:{server.port}/shard_{{index:05d}}.parquet"))


def test_file_url_template(tmp_path, monkeypatch):
    files = _fixture_shards(tmp_path / "remote", 3)
    monkeypatch.chdir(tmp_path)
    run_stage(download_stage, _url_cfg(f"file://{tmp_path}/remote/shard_{{index:05d}}.parquet"))
    for name, data in files.items():
        assert (tmp_path / "data/shards" / name).read_bytes() == data


def test_embedded_source_layout(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    run_stage(download_stage, make_cfg("experiment=smoke", "tracking.enabled=false"))
    m = read_manifest()
    assert m["val_shard"] == "shard_00003.parquet"
    for s in m["shards"]:
        pf = pq.ParquetFile(Path("data/shards") / s["name"])
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(i).num_rows == 16 for i in range(pf.num_row_groups - 1))
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    # Deterministic: same config -> byte-identical shards.
    first = {s["name"]: s["sha256"] for s in m["shards"]}
    run_stage(download_stage, make_cfg("experiment=smoke", "tracking.enabled=false"))
    assert {s["name"]: s["sha256"] for s in read_manifest()["shards"]} == first


def test_verify_rejects_truncated(tmp_path):
    files = _fixture_shards(tmp_path, 1)
    p = tmp_path / "shard_00000.parquet"
    p.write_bytes(files[p.name][:-100])
    with pytest.raises(Exception, match="not a readable parquet"):
        verify_shard(p)
