"""The download stage: embedded build, and HTTP/file fetches with injected faults."""
import contextlib
import hashlib
import http.server
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import make_cfg, make_repo_copy, run, subprocess_env

from nanopipe import artifacts
from nanopipe.data import download
from nanopipe.data.shards import read_manifest, split_paths, verify_shard, write_shard
from nanopipe.stage import run_stage
from nanopipe.stages import download as download_stage


def _fixture_shards(root: Path, n: int, big: bool = False) -> dict[str, bytes]:
    """n shards of 50 documents; `big`: ~100 KB of barely compressible text each, so that 4 KiB in
    the middle of the file lands in the data pages, not in the footer."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        p = root / f"shard_{i:05d}.parquet"
        if big:
            rng = random.Random(i)
            docs = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789 ", k=3000)) for _ in range(50)]
        else:
            docs = [f"document {i}-{j} " * 20 for j in range(50)]
        write_shard(p, docs, row_group_size=16 if not big else 8)
        out[p.name] = p.read_bytes()
    return out


def corrupt_middle(body: bytes, n: int = 4096) -> bytes:
    mid = len(body) // 2 - n // 2
    return body[:mid] + bytes(b ^ 0xFF for b in body[mid : mid + n]) + body[mid + n :]


class FaultyServer:
    """Serves fixture shards; `faults[name]` is a list of behaviours consumed per request."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.faults, self.hits = files, {}, {}
        self.etag = False  # publish each file's sha256 as its ETag (as the hub does in X-Linked-Etag)
        self.times: dict[str, list[float]] = {}  # GET arrival times per file
        self.slow_started = threading.Event()
        self.release = threading.Event()  # a "slow" response finishes once this is set
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
                if outer.etag:
                    self.send_header("ETag", f'"{hashlib.sha256(outer.files[name]).hexdigest()}"')
                self.end_headers()

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.hits[name] = outer.hits.get(name, 0) + 1  # GETs only: each is one fetch attempt
                outer.times.setdefault(name, []).append(time.monotonic())
                fault = outer.faults.get(name, []).pop(0) if outer.faults.get(name) else None
                if fault == "500":
                    self.send_error(500)
                    return
                if fault == "429":
                    self.send_response(429)
                    self.send_header("Retry-After", "2")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name not in outer.files or fault == "404":
                    self.send_error(404)
                    return
                body = outer.files[name]
                if fault == "truncate":  # a body cut short, with a length header that matches the cut
                    body = body[: len(body) // 2]
                if fault == "corrupt":  # 4 KiB flipped in the middle: the footer still reads fine
                    body = corrupt_middle(body)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "slow":  # half the body, then stall until released (or the client dies)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    outer.slow_started.set()
                    outer.release.wait(60)
                    body = body[len(body) // 2:]
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    s = FaultyServer(_fixture_shards(tmp_path / "remote", 3))
    yield s
    s.close()


@pytest.fixture
def big_server(tmp_path):
    s = FaultyServer(_fixture_shards(tmp_path / "remote", 3, big=True))
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


# ----------------------------------------------------------------------------- end-to-end verification (issue 18, item 4)


def test_mid_body_corruption_passes_the_footer_check_but_not_the_full_read(tmp_path):
    files = _fixture_shards(tmp_path, 1, big=True)
    p = tmp_path / "shard_00000.parquet"
    p.write_bytes(corrupt_middle(files[p.name]))
    assert verify_shard(p)["rows"] == 50  # the footer alone accepts it (what the old download checked)
    with pytest.raises(Exception, match="corrupt"):
        verify_shard(p, full=True)


def test_mid_body_corruption_is_fetched_again(big_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    big_server.faults = {"shard_00001.parquet": ["corrupt"]}
    run_stage(download_stage, _url_cfg(f"http://127.0.0.1:{big_server.port}/shard_{{index:05d}}.parquet"))
    assert big_server.hits["shard_00001.parquet"] == 2
    for name, data in big_server.files.items():
        assert (Path("data/shards") / name).read_bytes() == data


def test_persistent_corruption_fails_naming_the_url(big_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    big_server.etag = True  # the published sha256 catches it before the parquet read
    big_server.faults = {"shard_00002.parquet": ["corrupt"] * 10}
    url = f"http://127.0.0.1:{big_server.port}/shard_{{index:05d}}.parquet"
    with pytest.raises(download.DownloadError) as e:
        run_stage(download_stage, _url_cfg(url))
    msg = str(e.value)
    assert f"http://127.0.0.1:{big_server.port}/shard_00002.parquet" in msg and "published" in msg, msg
    assert big_server.hits["shard_00002.parquet"] == 3
    assert not (Path("data/shards") / "shard_00002.parquet").exists()


def test_a_shard_corrupted_on_disk_is_not_skipped_on_rerun(big_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{big_server.port}/shard_{{index:05d}}.parquet"
    run_stage(download_stage, _url_cfg(url))
    # the store (data/.downloads) is what a rerun trusts; data/shards holds links to it
    kept, out = Path("data/.downloads/shard_00000.parquet"), Path("data/shards/shard_00000.parquet")
    assert kept.stat().st_ino == out.stat().st_ino, "the output should be a hard link to the store, not a copy"
    data = kept.read_bytes()
    kept.unlink()  # DVC may hardlink it to the cache: write a new file, as a bit rot / bad copy would
    kept.write_bytes(corrupt_middle(data))
    big_server.hits.clear()
    run_stage(download_stage, _url_cfg(url))
    assert big_server.hits == {"shard_00000.parquet": 1}
    assert kept.read_bytes() == data and out.read_bytes() == data


def test_more_shards_fetch_only_the_new_ones(server, tmp_path, monkeypatch):
    """The store outlives data/shards (which DVC deletes before every rerun of the stage): a config that
    wants one more shard fetches that one only."""
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{server.port}/shard_{{index:05d}}.parquet"
    run_stage(download_stage, _url_cfg(url, **{"data.num_train_shards": 1}))
    assert sorted(server.hits) == ["shard_00000.parquet", "shard_00002.parquet"]
    import shutil

    shutil.rmtree("data/shards")  # what DVC does before it runs a stage whose output is not `persist`
    server.hits.clear()
    run_stage(download_stage, _url_cfg(url))
    assert server.hits == {"shard_00001.parquet": 1}
    assert artifacts.read_json("metrics/download.json")["skipped"] == 2
    assert sorted(artifacts.read_json("data/shards/.sources.json")) == [f"shard_0000{i}.parquet" for i in range(3)]


def test_retry_after_is_honoured(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server.faults = {"shard_00000.parquet": ["429"]}
    run_stage(download_stage, _url_cfg(f"http://127.0.0.1:{server.port}/shard_{{index:05d}}.parquet"))
    first, second = server.times["shard_00000.parquet"]
    assert second - first >= 2.0, f"retried after {second - first:.2f} s; the server asked for 2 s"


def test_retry_after_forms():
    from email.utils import formatdate

    now = 1_000_000.0
    assert download.parse_retry_after("2") == 2.0
    assert download.parse_retry_after(formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7.0)
    assert download.parse_retry_after(formatdate(now - 7, usegmt=True), now=now) == 0.0
    assert download.parse_retry_after("soon") is None and download.parse_retry_after(None) is None
    assert download.RETRY_AFTER_CAP <= 600


def test_published_hash_forms():
    import base64

    sha = hashlib.sha256(b"x").hexdigest()
    assert download._hash_in({"X-Linked-Etag": f'"{sha}"', "ETag": '"abc"'}) == ("sha256", sha)
    assert download._hash_in({"etag": f'W/"{sha.upper()}"'}) == ("sha256", sha)
    assert download._hash_in({"ETag": '"d41d8cd98f00b204e9800998ecf8427e"'}) is None  # an S3 md5-ish ETag: not trusted
    b64 = base64.b64encode(hashlib.sha256(b"x").digest()).decode()
    assert download._hash_in({"Digest": f"sha-256={b64}"}) == ("sha256", sha)


@pytest.mark.parametrize("template", ["http://h/shard_{{index}}.parquet", "http://h/shard_{index}_{split}.parquet"])
def test_template_without_a_usable_index_is_a_config_error(template):
    from nanopipe.config import ConfigError

    with pytest.raises(ConfigError, match="data.url_template"):
        _url_cfg(template)


@pytest.mark.slow
def test_killed_download_leaves_no_junk_and_the_rerun_resumes_and_hashes_as_a_clean_run(big_server, tmp_path):
    url = f"http://127.0.0.1:{big_server.port}/shard_{{index:05d}}.parquet"
    over = ["data.source=url", f"data.url_template='{url}'", "data.total_shards=3", "data.val_shard=2",
            "data.num_train_shards=2", "data.retries=2", "data.backoff=0.01", "data.workers=3", "tracking.enabled=false"]
    repo = make_repo_copy(tmp_path / "repo", *over)
    env = {"PYTHONPATH": str(repo / "src")}

    def shards_hash():
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        return next(o["md5"] for o in lock["stages"]["download"]["outs"] if o["path"] == "data/shards")

    run(["dvc", "repro", "download"], repo, env=env)
    clean = shards_hash()
    listing = sorted(p.name for p in (repo / "data/shards").iterdir())
    # start over with nothing: no output, no download store, no DVC cache (which would restore the stage
    # from its run-cache without running it: tests/test_run_cache.py)
    import shutil

    for d in ("data/shards", "data/.downloads", ".dvc/cache"):
        shutil.rmtree(repo / d)

    big_server.faults = {"shard_00001.parquet": ["slow"]}
    proc = subprocess.Popen(["dvc", "repro", "download"], cwd=repo, env=subprocess_env(env), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert big_server.slow_started.wait(60), "the download never reached the slow shard"
        time.sleep(1.0)  # the stage has written half the body to its temp file
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        big_server.release.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    junk = [p.name for p in (repo / "data/shards").iterdir() if ".tmp" in p.name]
    assert junk == [], f"temp files inside the DVC output: {junk}"
    assert any((repo / "data/.partial").iterdir()), "the kill should have left a partial download (outside)"

    big_server.hits.clear()
    out = run(["dvc", "repro", "download"], repo, env=env).stdout
    assert "Running stage 'download'" in out, out
    # resumed: the two shards verified before the kill come from data/.downloads, only the third is fetched
    assert big_server.hits == {"shard_00001.parquet": 1}, big_server.hits
    assert sorted(p.name for p in (repo / "data/shards").iterdir()) == listing
    assert shards_hash() == clean
    assert not any((repo / "data/.partial").iterdir())
