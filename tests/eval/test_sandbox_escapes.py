"""The OS sandbox (bubblewrap) against programs that get past the in-interpreter guard.

Every program here first undoes the guard (a closure's cell, sqlite3, re-imported posix /
_posixsubprocess / _socket, ctypes) and then tries to do harm; each test asserts that the harm
did not happen on the host: the secret did not leak, the file outside is unchanged, the listener
got no connection, this process is alive, and no process of the run survives it. These run only
under isolation="bwrap" (never against the guard alone: they would really escape).
"""
import errno
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import require_tool

from nanopipe import sandbox
from nanopipe.sandbox import MAX_PROCESSES, SandboxUnavailableError, execute_code

SRC = Path(__file__).resolve().parents[2] / "src"

# re-import the modules the guard disabled: fresh module objects, original functions
UNGUARD = """
import sys, importlib
for _m in ("posix", "_posixsubprocess", "_socket"):
    sys.modules.pop(_m, None)
import posix, _posixsubprocess, _socket
import os; importlib.reload(os)
import subprocess; importlib.reload(subprocess)
import socket; importlib.reload(socket)
"""


@pytest.fixture(scope="module", autouse=True)
def bwrap_available():
    try:
        sandbox.resolve_isolation("bwrap")
    except SandboxUnavailableError as e:
        require_tool("bwrap", f"no usable bubblewrap: {e}; apt-get install bubblewrap, as .ci/run does", found=False)


def run(code, timeout=5.0, **kwargs):
    r = execute_code(code, timeout=timeout, isolation="bwrap", **kwargs)
    assert r.isolation == "bwrap"
    return r


def marker():
    """A sleep duration no other process on the machine uses: it marks the run's processes in ps."""
    return f"{random.randint(1000, 9999)}.{random.randint(100000, 999999)}"


def processes_with(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def assert_nothing_left(*texts):
    """No process of the run is left: neither a marked one nor a sandbox interpreter."""
    deadline = time.monotonic() + 2.0
    texts = (*texts, "/sandbox/sandbox.py")
    while True:
        left = {t: processes_with(t) for t in texts}
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, f"processes survived the run: {left}"
        time.sleep(0.05)


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary.txt"
    path.write_text("alive")
    yield path
    assert path.read_text() == "alive", "a sandboxed program modified a file outside its sandbox"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"], "a sandboxed program created a file outside"


# ----------------------------------------------------------------------------- the escapes

def test_parent_environment_is_not_readable(tmp_path):
    """/proc/<ppid>/environ: the caller's secrets. The caller here is a process started with a secret
    in its environment (a process's /proc environ is what it was started with)."""
    secret = f"hunter2-{random.randint(0, 1 << 60)}"
    code = ("import os\n"
            "found = []\n"
            "for pid in ['self', str(os.getppid()), '1', str(PARENT)] + os.listdir('/proc'):\n"
            "    try:\n"
            "        found.append(open(f'/proc/{pid}/environ', 'rb').read().decode('latin-1'))\n"
            "    except OSError as e:\n"
            "        pass\n"
            "print(repr(found), repr(dict(os.environ)))\n")
    caller = ("import json, os, sys\n"
              "from nanopipe.sandbox import execute_code\n"
              "code = 'PARENT = %d\\n' % os.getpid() + sys.stdin.read()\n"
              "r = execute_code(code, timeout=5, isolation='bwrap')\n"
              "print(json.dumps({'stdout': r.stdout, 'error': r.error, 'isolation': r.isolation,\n"
              "                  'own': secret_seen}))\n")
    caller = caller.replace("secret_seen", "os.environ['NANOPIPE_TEST_SECRET'] in open('/proc/self/environ').read()")
    env = {**os.environ, "NANOPIPE_TEST_SECRET": secret, "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-c", caller], input=code, env=env, capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["own"] is True  # the secret is in the caller's /proc environ: the test would see a leak
    assert out["isolation"] == "bwrap" and out["error"] is None and out["stdout"]
    assert secret not in out["stdout"]
    assert "NANOPIPE_TEST_SECRET" not in out["stdout"]


def test_writing_outside_through_the_guards_closure(canary):
    # the guard's open() wraps the real one; its closure hands the real one back
    r = run(f"real = next(c.cell_contents for c in open.__closure__\n"
            f"            if getattr(c.cell_contents, '__name__', '') == 'open')\n"
            f"print(real is not open)\n"
            f"for path in [{str(canary)!r}, {str(canary.parent / 'new.txt')!r}, '/usr/pwned', '/pwned']:\n"
            f"    try:\n"
            f"        real(path, 'w').write('pwned')\n"
            f"        print('wrote', path)\n"
            f"    except OSError as e:\n"
            f"        print('refused', path, e.errno)\n"
            f"import os\n"
            f"print(os.path.exists({str(canary.parent)!r}))\n")
    assert r.success, r
    lines = r.stdout.splitlines()
    assert lines[0] == "True"  # the guard really was undone
    assert not any(line.startswith("wrote") for line in lines), r.stdout
    assert lines[-1] == "False"  # the host's files outside the system are not even visible
    assert not Path("/usr/pwned").exists() and not Path("/pwned").exists()


def test_writing_outside_through_sqlite3(canary):
    r = run(f"import sqlite3\n"
            f"for path in [{str(canary)!r}, {str(canary.parent / 'pwned.db')!r}, '/usr/pwned.db']:\n"
            f"    try:\n"
            f"        db = sqlite3.connect(path)\n"
            f"        db.execute('create table t (x)'); db.commit()\n"
            f"        print('wrote', path)\n"
            f"    except sqlite3.Error as e:\n"
            f"        print('refused', path, e)\n")
    assert r.success, r
    assert "wrote" not in r.stdout and r.stdout.count("refused") == 3, r.stdout
    assert not Path("/usr/pwned.db").exists()


def test_reimported_posix_fork_system_kill(canary):
    m = marker()
    r = run(UNGUARD + f"pid = posix.fork()\n"
                      f"if pid == 0:\n"
                      f"    posix.execv('/bin/sleep', ['sleep', {m!r}])\n"
                      f"print('forked', pid)\n"
                      f"print('system', posix.system('echo pwned > {canary}; echo pwned > /usr/pwned; sleep {m} &'))\n"
                      f"for target in ({os.getpid()}, posix.getppid(), 1):\n"
                      f"    try:\n"
                      f"        posix.kill(target, 9)\n"
                      f"        print('killed', target)\n"
                      f"    except OSError as e:\n"
                      f"        print('kill refused', target, e.errno)\n")
    assert r.success, r
    assert "forked" in r.stdout and "system" in r.stdout  # the calls themselves work inside
    assert f"kill refused {os.getpid()} {errno.ESRCH}" in r.stdout  # this process is not even visible
    os.kill(os.getpid(), 0)
    assert_nothing_left(m)


def test_reimported_posixsubprocess_gives_subprocesses_that_stay_inside(canary):
    m = marker()
    r = run(UNGUARD + f"r = subprocess.run(['sh', '-c', 'echo pwned > {canary}; echo pwned > /usr/pwned'],\n"
                      f"                   capture_output=True)\n"
                      f"print('rc', r.returncode)\n"
                      f"subprocess.Popen(['sleep', {m!r}], start_new_session=True)\n"
                      f"subprocess.Popen(['sh', '-c', 'nohup sleep {m} >/dev/null 2>&1 &'])\n"
                      f"import time; time.sleep(0.2)\n"
                      f"print('spawned')\n")
    assert r.success, r
    assert "rc " in r.stdout and "rc 0" not in r.stdout  # the shell ran, and its writes failed
    assert "spawned" in r.stdout
    assert not Path("/usr/pwned").exists()
    assert_nothing_left(m)


def _listeners():
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("0.0.0.0", 0))  # loopback and every address of this machine
    tcp.listen(8)
    tcp.setblocking(False)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0nanopipe-sandbox-test-{random.randint(0, 1 << 60)}"  # abstract: no file, per network namespace
    unix.bind(name)
    unix.listen(8)
    unix.setblocking(False)
    return tcp, unix, name


def _host_addresses():
    addrs = {"127.0.0.1"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface's address
            addrs.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(addrs)


def _assert_no_connection(*servers):
    for server in servers:
        with pytest.raises(BlockingIOError):
            conn, _ = server.accept()
            conn.close()


def test_reimported_socket_reaches_no_listener():
    tcp, unix, name = _listeners()
    port = tcp.getsockname()[1]
    try:
        r = run(UNGUARD + f"for host in {_host_addresses()!r}:\n"
                          f"    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                          f"    s.settimeout(1)\n"
                          f"    try:\n"
                          f"        s.connect((host, {port}))\n"
                          f"        print('connected', host)\n"
                          f"    except OSError as e:\n"
                          f"        print('refused', host, e.errno)\n"
                          f"s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
                          f"try:\n"
                          f"    s.connect({name!r})\n"
                          f"    print('connected unix')\n"
                          f"except OSError as e:\n"
                          f"    print('refused unix', e.errno)\n"
                          f"try:\n"
                          f"    socket.create_connection(('pypi.org', 443), timeout=1)\n"
                          f"    print('connected pypi')\n"
                          f"except OSError as e:\n"
                          f"    print('refused pypi', e)\n")
        assert r.success, r
        assert "connected" not in r.stdout and r.stdout.count("refused") == len(_host_addresses()) + 2, r.stdout
        _assert_no_connection(tcp, unix)
    finally:
        tcp.close()
        unix.close()


def test_ctypes_fork_system_kill_socket(canary):
    tcp, unix, _ = _listeners()
    port = tcp.getsockname()[1]
    m = marker()
    try:
        r = run(f"import ctypes, struct\n"
                f"libc = ctypes.CDLL(None, use_errno=True)\n"
                f"pid = libc.fork()\n"
                f"if pid == 0:\n"
                f"    libc.setsid()\n"
                f"    libc.execv(b'/bin/sleep', (ctypes.c_char_p * 3)(b'sleep', b'{m}', None))\n"
                f"    libc._exit(0)\n"
                f"print('forked', pid > 0)\n"
                f"print('system', libc.system(b'echo pwned > {canary}; echo pwned > /usr/pwned'))\n"
                f"print('kill', libc.kill({os.getpid()}, 9), ctypes.get_errno())\n"
                f"fd = libc.socket(2, 1, 0)\n"
                f"addr = struct.pack('<HH4s8x', 2, __import__('_socket').htons({port}), bytes([127, 0, 0, 1]))\n"
                f"print('connect', libc.connect(fd, addr, len(addr)), ctypes.get_errno())\n")
        assert r.success, r
        assert "forked True" in r.stdout and f"kill -1 {errno.ESRCH}" in r.stdout, r.stdout
        assert "connect -1" in r.stdout, r.stdout
        _assert_no_connection(tcp, unix)
        assert not Path("/usr/pwned").exists()
        os.kill(os.getpid(), 0)
        assert_nothing_left(m)
    finally:
        tcp.close()
        unix.close()


def test_setsid_child_does_not_survive_the_run():
    m = marker()
    # double fork + setsid: the classic daemon, out of the run's process group and session
    r = run(UNGUARD + f"if posix.fork() == 0:\n"
                      f"    posix.setsid()\n"
                      f"    if posix.fork() == 0:\n"
                      f"        posix.execv('/bin/sleep', ['sleep', {m!r}])\n"
                      f"    posix._exit(0)\n"
                      f"import time; time.sleep(0.3)\n"
                      f"print('daemonised')\n")
    assert r.success and r.stdout == "daemonised\n", r
    assert_nothing_left(m)


# ----------------------------------------------------------------------------- the classic list

def test_fork_bomb_hits_the_process_limit():
    m = marker()
    r = run(UNGUARD + f"n = 0\n"
                      f"try:\n"
                      f"    while True:\n"
                      f"        if posix.fork() == 0:\n"
                      f"            posix.execv('/bin/sleep', ['sleep', {m!r}])\n"
                      f"        n += 1\n"
                      f"except OSError as e:\n"
                      f"    print(n, e.errno)\n")
    assert r.success, r
    n, err = map(int, r.stdout.split())
    assert err == errno.EAGAIN and 1 <= n < MAX_PROCESSES, r.stdout
    assert_nothing_left(m)


def test_recursive_fork_bomb_is_contained_and_reaped():
    t0 = time.monotonic()
    r = run(UNGUARD + "while True:\n"
                      "    try:\n"
                      "        posix.fork()\n"
                      "    except OSError:\n"
                      "        pass\n", timeout=1.0)
    assert not r.success and r.timeout, r
    assert time.monotonic() - t0 < 10
    assert_nothing_left()


def test_memory_bomb():
    r = run("x = bytearray(1 << 30)")
    assert r.memory_exceeded and not r.success
    # past the guard: a child that allocates is capped too (RLIMIT_AS is per process, inherited)
    r = run(UNGUARD + "pid = posix.fork()\n"
                      "if pid == 0:\n"
                      "    try:\n"
                      "        x = bytearray(1 << 30)\n"
                      "        posix._exit(0)\n"
                      "    except MemoryError:\n"
                      "        posix._exit(42)\n"
                      "print(posix.waitstatus_to_exitcode(posix.waitpid(pid, 0)[1]))\n")
    assert r.success and r.stdout == "42\n", r
    # the private /tmp is a size-capped tmpfs: writing files cannot fill the host's memory or disk
    r = run("import os\n"
            "total = 0\n"
            "try:\n"
            "    for i in range(1000):\n"
            "        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(bytes(8 << 20)); total += 8 << 20\n"
            "except OSError as e:\n"
            "    print(total, e.errno)\n", maximum_memory_bytes=64 << 20)
    assert r.success, r
    total, err = map(int, r.stdout.split())
    assert total <= 64 << 20 and err in (errno.ENOSPC, errno.EFBIG), r.stdout


def test_infinite_loop_that_ignores_its_timers_is_killed():
    t0 = time.monotonic()
    r = run("import signal\n"
            "for s in (signal.SIGALRM, signal.SIGXCPU, signal.SIGTERM):\n"
            "    signal.signal(s, signal.SIG_IGN)\n"
            "while True:\n"
            "    pass", timeout=0.5)
    assert r.timeout and not r.success
    assert time.monotonic() - t0 < 10
    assert_nothing_left()


def test_signals_to_the_parent_and_to_everyone():
    r = run(UNGUARD + f"import signal\n"
                      f"for target in (posix.getppid(), {os.getpid()}, {os.getppid()}):\n"
                      f"    try:\n"
                      f"        posix.kill(target, signal.SIGKILL)\n"
                      f"    except OSError as e:\n"
                      f"        print(target, e.errno)\n"
                      f"try:\n"
                      f"    signal.pidfd_send_signal(posix.pidfd_open({os.getpid()}), signal.SIGKILL)\n"
                      f"except OSError as e:\n"
                      f"    print('pidfd', e.errno)\n"
                      f"print(sorted(int(p) for p in posix.listdir('/proc') if p.isdigit()))\n"
                      f"try:\n"  # every process it may signal but itself: none outside the run
                      f"    posix.kill(-1, signal.SIGKILL)\n"
                      f"except OSError as e:\n"
                      f"    print(-1, e.errno)\n")
    os.kill(os.getpid(), 0)  # this process is alive
    os.kill(os.getppid(), 0)
    assert r.success, r
    lines = r.stdout.splitlines()
    assert lines[0] == f"1 {errno.EPERM}"  # its init belongs to another uid
    assert lines[1:3] == [f"{os.getpid()} {errno.ESRCH}", f"{os.getppid()} {errno.ESRCH}"]  # not visible
    assert lines[3] == f"pidfd {errno.ESRCH}" and lines[4] == "[1, 2]" and lines[5] == f"-1 {errno.ESRCH}", lines
    assert_nothing_left()


def test_sees_only_its_own_processes_and_files():
    r = run("import os\n"
            "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "print(sorted(os.listdir('/')))\n"
            "print(os.path.exists('/etc/shadow'), os.path.exists('/root/.ssh'), os.path.exists('/home'))\n"
            "print(os.getuid() != 0, sorted(os.environ))\n")
    assert r.success, r
    pids, root, hidden, who = r.stdout.splitlines()
    assert eval(pids) == [1, 2]  # its init and itself
    assert set(eval(root)) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root", "sandbox",
                               "sbin", "tmp", "usr", "opt", "home"}
    assert hidden == "False False False"
    assert who == "True ['HOME', 'LANG', 'LC_ALL', 'OMP_NUM_THREADS', 'PATH', 'PWD', 'TMPDIR']"


# ----------------------------------------------------------------------------- refusal without bwrap

@pytest.fixture
def no_bwrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no bwrap on PATH
    sandbox._bwrap_problem.cache_clear()
    yield
    sandbox._bwrap_problem.cache_clear()


def test_without_bwrap_the_default_refuses_with_the_fix(no_bwrap):
    for isolation in ("auto", "bwrap"):
        with pytest.raises(SandboxUnavailableError) as e:
            execute_code("print(1)", isolation=isolation)
        msg = str(e.value)
        assert f"chat_eval.sandbox={isolation}" in msg and "apt-get install bubblewrap" in msg
        assert "chat_eval.sandbox=in_process" in msg and "not installed" in msg
    with pytest.raises(SandboxUnavailableError):
        execute_code("print(1)")  # the default is auto


def test_without_bwrap_the_opt_in_runs_the_guard(no_bwrap):
    r = execute_code("print(1)", isolation="in_process")
    assert r.success and r.stdout == "1\n" and r.isolation == "in_process"
    r = execute_code("import os; os.system('true')", isolation="in_process")
    assert not r.success and "TypeError" in r.error  # the guard is on


def test_not_linux_refuses(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    sandbox._bwrap_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailableError, match="needs Linux namespaces; this is darwin"):
            sandbox.resolve_isolation("auto")
    finally:
        monkeypatch.undo()
        sandbox._bwrap_problem.cache_clear()


def test_bad_isolation():
    with pytest.raises(ValueError, match="isolation"):
        execute_code("pass", isolation="docker")
    with pytest.raises(ValueError, match="max_processes"):
        execute_code("pass", max_processes=1)
