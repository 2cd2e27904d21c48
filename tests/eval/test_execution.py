"""The sandbox: ordinary programs run, hostile ones are contained and reported, the host is unharmed.

Each test runs under both isolations: "bwrap" (the OS sandbox with the guard inside it) and
"in_process" (the guard alone, the opt-in). The programs here are the ones the guard stops;
tests/eval/test_sandbox_escapes.py has those that get past it, which only bwrap holds."""
import builtins
import glob
import os
import shutil
import socket
import time

import pytest
from helpers import require_tool

from nanopipe.sandbox import MAX_OUTPUT_CHARS, ExecutionResult, SandboxUnavailableError, execute_code, resolve_isolation


@pytest.fixture(params=["bwrap", "in_process"])
def run(request):
    isolation = request.param
    if isolation == "bwrap":
        try:
            resolve_isolation("bwrap")
        except SandboxUnavailableError as e:
            require_tool("bwrap", f"no usable bubblewrap: {e}; apt-get install bubblewrap, as .ci/run does", found=False)

    def run(code, timeout=3.0, **kwargs):  # generous: only the timeout tests wait for it
        r = execute_code(code, timeout=timeout, isolation=isolation, **kwargs)
        assert r.isolation == isolation
        return r
    run.isolation = isolation
    return run


def children_of_this_process():
    pids = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids |= {int(p) for p in f.read().split()}
    return pids


def sandbox_children():
    """Children that are sandbox interpreters (`python -I -S`); other tests may leave unrelated ones."""
    out = set()
    for pid in children_of_this_process():
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"-I" in argv and b"-S" in argv:
            out.add(pid)
    return out


@pytest.fixture
def canary(tmp_path):
    """A file and a directory outside the sandbox that hostile programs try to destroy."""
    path = tmp_path / "canary.txt"
    path.write_text("alive")
    (tmp_path / "canary_dir").mkdir()
    (tmp_path / "canary_dir" / "f").write_text("alive")
    yield path
    assert path.read_text() == "alive", "a sandboxed program modified a file outside its temp dir"
    assert (tmp_path / "canary_dir" / "f").read_text() == "alive"


def test_ordinary_program_runs_and_output_is_captured(run):
    r = run("import sys\nprint(1)\nprint('warn', file=sys.stderr)\nx = sum(range(10))\nassert x == 45")
    assert r.success and r.passed and r.stdout == "1\n" and r.stderr == "warn\n"
    assert not r.timeout and not r.memory_exceeded and r.error is None
    assert repr(r) == "ExecutionResult(success=True, stdout='1\\n', stderr='warn\\n')"


def test_failures_are_reported_with_their_type(run):
    r = run("assert 1 == 2, 'nope'")
    assert not r.success and r.error == "AssertionError: nope"
    assert run("raise ValueError('bad')").error == "ValueError: bad"
    assert run("import sys; sys.exit(0)").error.startswith("SystemExit")
    assert run("def f(:").error.startswith("SyntaxError")
    assert run("input()").error.startswith("OSError")  # stdin refuses reads instead of blocking
    assert run("exit()").error.startswith("TypeError")  # exit/quit are disabled
    assert repr(run("raise ValueError('bad')")) == "ExecutionResult(success=False, error='ValueError: bad')"


def test_runs_in_a_private_temp_dir_that_is_removed(run, canary):
    r = run("import tempfile\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n"
            "print(tempfile.gettempdir())")
    assert r.success, r
    scratch, workdir = r.stdout.split()
    assert scratch == "ok"
    if run.isolation == "bwrap":
        assert workdir == "/tmp"  # a private tmpfs, gone with the run
    else:
        assert "nanopipe-sandbox-" in workdir
        assert not os.path.exists(workdir)  # cleaned up
    assert str(canary.parent) not in workdir


def test_os_system_and_subprocess_are_disabled(run, canary):
    for code in [f"import os; os.system('rm -rf {canary.parent}')",
                 f"import subprocess; subprocess.run(['rm', '-rf', '{canary.parent}'])",
                 f"import os; os.execv('/bin/rm', ['rm', '-rf', '{canary.parent}'])",
                 f"import os; os.posix_spawn('/bin/rm', ['rm', '-rf', '{canary.parent}'], {{}})",
                 f"import os; os.popen('rm -rf {canary.parent}')"]:
        r = run(code)
        assert not r.success and r.error, code


def test_shutil_rmtree_and_os_remove_are_disabled(run, canary):
    for code in [f"import shutil; shutil.rmtree('{canary.parent / 'canary_dir'}')",
                 f"import os; os.remove('{canary}')",
                 f"import os; os.unlink('{canary}')",
                 f"import os; os.rename('{canary}', '{canary}.moved')",
                 f"import shutil; shutil.move('{canary}', 'here.txt')",
                 f"import os; os.chmod('{canary}', 0)",
                 f"import posix; posix.unlink('{canary}')"]:
        r = run(code)
        assert not r.success and r.error, code


def test_writing_outside_the_temp_dir_is_refused(run, canary):
    for code in [f"open('{canary}', 'w').write('pwned')",
                 f"open('{canary}', 'a').write('pwned')",
                 f"import pathlib; pathlib.Path('{canary}').write_text('pwned')",
                 f"import io; io.FileIO('{canary}', 'w')",
                 f"import os; os.open('{canary}', os.O_WRONLY | os.O_TRUNC)",
                 "open('../escape.txt', 'w')",
                 f"import os; os.mkdir('{canary.parent / 'newdir'}')",
                 f"import os; os.symlink('{canary}', 'link')"]:
        r = run(code)
        assert not r.success and r.error, code
    assert not (canary.parent / "newdir").exists()
    if run.isolation == "bwrap":  # the host's files are not even there (the guard's root is the private /tmp)
        assert "No such file or directory" in run(f"open('{canary}', 'w')").error
        assert "No such file or directory" in run(f"open('{canary}')").error
    else:
        assert "writing outside" in run(f"open('{canary}', 'w')").error
        assert run(f"print(open('{canary}').read())").stdout == "alive\n"  # reading is fine


def test_fork_bomb_is_contained(run):
    before = children_of_this_process()
    for code in ["import os\nwhile True:\n    os.fork()",
                 "import posix\nwhile True:\n    posix.fork()",
                 "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
                 "import pty; pty.fork()"]:
        r = run(code)
        assert not r.success and "TypeError" in r.error, code
    assert children_of_this_process() <= before


def test_infinite_loop_times_out(run):
    t0 = time.monotonic()
    r = run("while True:\n    pass", timeout=0.5)
    assert r.timeout and not r.success and r.error == "Execution timed out"
    assert time.monotonic() - t0 < 10
    assert run("import time; time.sleep(60)", timeout=0.5).timeout


def test_a_program_that_ignores_its_timer_is_killed(run):
    r = run("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass", timeout=0.5)
    assert r.timeout and not r.success and r.error == "Execution timed out (process killed)"


def test_memory_limit(run):
    # bytes(n) is calloc'ed (no page touched), so these are fast; timeouts are generous for a loaded machine
    r = run("x = bytearray(1 << 30)", timeout=5)  # 1 GiB against the default 256 MiB cap
    assert r.memory_exceeded and not r.success and r.error.startswith("Memory limit exceeded")
    r = run("x = [0] * (1 << 28)", timeout=5, maximum_memory_bytes=128 * 1024 * 1024)
    assert r.memory_exceeded
    assert run("x = bytes(64 << 20); print(len(x))", timeout=5).stdout == f"{64 << 20}\n"  # within the cap
    assert run("x = bytes(300 << 20); print('ok')", timeout=5).memory_exceeded
    r = run("x = bytes(300 << 20); print('ok')", timeout=5, maximum_memory_bytes=None)  # no cap at all
    assert r.success, r


def test_network_is_disabled(run):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for code in [f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     f"import socket; s = socket.socket(); s.connect(('127.0.0.1', {port}))",
                     f"import _socket; s = _socket.socket(); s.connect(('127.0.0.1', {port}))",
                     f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"]:
            r = run(code)
            assert not r.success and "network" in r.error, (code, r)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_killing_the_parent_is_refused(run):
    for code in ["import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
                 "import os, signal; os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
                 "import posix, signal; posix.kill(posix.getppid(), signal.SIGTERM)",
                 "import signal, os; signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)"]:
        r = run(code)
        assert not r.success and r.error, code
    os.kill(os.getpid(), 0)  # still here


def test_escaped_grandchild_is_killed_with_the_group(run):
    # ctypes gets past the Python-level guard (it is not a security boundary); the process group kill still reaps it
    # (under bwrap the pid printed is the namespace's: test_sandbox_escapes.py checks that case)
    if run.isolation == "bwrap":
        pytest.skip("in_process only")
    r = run("import ctypes, time\npid = ctypes.CDLL(None).fork()\nif pid == 0:\n    time.sleep(60)\nprint(pid)")
    assert r.success, r
    pid = int(r.stdout)
    time.sleep(0.2)
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        assert state in ("Z", "X"), f"grandchild {pid} still running (state {state})"
    except FileNotFoundError:
        pass  # already reaped


def test_died_without_result_is_reported_not_as_timeout(run):
    r = run("import os; os._exit(3)")
    assert not r.success and not r.timeout and "no result returned" in r.error and "exit code 3" in r.error
    r = run("import ctypes; ctypes.string_at(0)")
    assert not r.success and "SIGSEGV" in r.error


def test_environment_is_not_inherited(run, monkeypatch):
    monkeypatch.setenv("NANOPIPE_TEST_SECRET", "hunter2")
    r = run("import os; print(os.environ.get('NANOPIPE_TEST_SECRET'))")
    assert r.stdout == "None\n"


def test_output_is_truncated(run):
    r = run(f"print('x' * {MAX_OUTPUT_CHARS + 5000})")
    assert r.success and len(r.stdout) < MAX_OUTPUT_CHARS + 100 and "truncated" in r.stdout


def test_host_process_is_unharmed_after_the_battery(run):
    cwd = os.getcwd()
    run("import os, shutil, builtins, subprocess\nos.system = os.kill = shutil.rmtree = builtins.open = subprocess.Popen = None")
    assert os.getcwd() == cwd
    assert callable(os.system) and callable(os.kill) and callable(shutil.rmtree) and callable(os.fork)
    assert builtins.open is open and callable(socket.socket)
    assert not sandbox_children()  # every sandbox child was reaped
    assert isinstance(run("print(2)"), ExecutionResult)


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        execute_code("pass", timeout=0)
    with pytest.raises(ValueError, match="maximum_memory_bytes"):
        execute_code("pass", maximum_memory_bytes=0)
