"""Execution of untrusted, model-written Python (HumanEval grading) in a sandbox.

    result = execute_code("print(1)", timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024)
    result.success, result.stdout, result.isolation  # True, "1\\n", "bwrap"

Two layers; `isolation` says which outer one a call gets:
- "bwrap" (the default, "auto"): the OS is the boundary. The program runs under bubblewrap in
  its own PID, network, IPC, UTS and mount namespaces: the system (/usr and the interpreter's
  prefix) read-only, nothing else of the host's file system visible, a private size-capped
  tmpfs /tmp as its work dir, an environment of PATH/HOME/LANG only, no network at all (its own
  empty network namespace, loopback included), no view of any process outside (its own /proc),
  a new session, and --die-with-parent: when the run ends or is killed, the kernel kills every
  process left in the namespace, whatever it did (setsid, double fork). Inside, before the
  program runs: RLIMIT_AS/DATA (memory), RLIMIT_CPU, RLIMIT_NPROC (processes and threads),
  RLIMIT_FSIZE, RLIMIT_NOFILE, no core files; as root, the child then drops to a fresh
  unprivileged uid (root ignores RLIMIT_NPROC, and an unused uid can signal nothing), otherwise
  bwrap maps the caller's uid in a new user namespace, whose process count starts at zero.
  Where bwrap is missing or cannot create namespaces (macOS, some containers), "auto"/"bwrap"
  REFUSE with SandboxUnavailableError naming the config key and the package to install.
- "in_process" (opt-in only): the in-interpreter guard alone, in a fresh interpreter in its own
  session (below). It stops accidents, not hostile code: re-importing posix/_socket/ctypes,
  a closure's cell or sqlite3 get past it, it cannot hide /proc/<ppid>/environ, and a child that
  calls setsid() outlives the group kill.
The guard also runs as the inner layer under bwrap (cheap, and it keeps the error messages).

The guard (nanochat's reliability guard, extended): destructive os/shutil functions, subprocess,
exit/quit/help disabled, fork/exec/spawn/kill through posix disabled, no sockets, no file writes
outside the work dir; a wall-clock limit (SIGALRM inside; from outside, the whole run is
SIGKILLed at timeout + 1 s whatever it does); RLIMIT_AS/DATA/STACK/FSIZE = maximum_memory_bytes
(not on macOS): allocation fails with MemoryError, reported as memory_exceeded.

Why not nanochat's multiprocessing.Process: forking a large PyTorch/CUDA process and then
lowering RLIMIT_AS below its already-mapped size makes every allocation in the child fail, and
the spawn/forkserver methods re-import the caller's __main__ (slow, side effects). A fresh
interpreter costs ~20 ms and has none of these problems.
"""
import contextlib
import errno
import faulthandler
import functools
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

MAX_OUTPUT_CHARS = 100_000  # captured stdout/stderr kept per stream; the rest is cut with a marker
KILL_GRACE_S = 1.0  # extra wall time before the parent kills a child that ignores its own timer
MAX_PROCESSES = 8  # bwrap: RLIMIT_NPROC inside (processes + threads of the run, its init included)
NOFILE = 256  # bwrap: RLIMIT_NOFILE inside
TMPFS_BYTES = 256 * 1024 * 1024  # bwrap: size of the private /tmp when maximum_memory_bytes is None
MAX_RESULT_BYTES = 16 * MAX_OUTPUT_CHARS  # result.json larger than this is not read (it was tampered with)

ISOLATIONS = ("auto", "bwrap", "in_process")
CONFIG_KEY = "chat_eval.sandbox"  # the setting that chooses the isolation, named in the refusal
_SANDBOX_UID_BASE = 0x70000000  # as root, each run drops to a fresh uid in [base, base + 2**24): owns nothing


class SandboxUnavailableError(RuntimeError):
    """OS isolation was asked for (or is the default) and cannot be had here."""


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False
    isolation: Optional[str] = None  # "bwrap" or "in_process": the outer layer this run had

    @property
    def passed(self):
        return self.success

    def __repr__(self):
        parts = [f"ExecutionResult(success={self.success}"]
        if self.timeout:
            parts.append(", timeout=True")
        if self.memory_exceeded:
            parts.append(", memory_exceeded=True")
        if self.error:
            parts.append(f", error={self.error!r}")
        if self.stdout:
            parts.append(f", stdout={self.stdout!r}")
        if self.stderr:
            parts.append(f", stderr={self.stderr!r}")
        parts.append(")")
        return "".join(parts)


# -----------------------------------------------------------------------------
# Parent side

def _child_env(workdir):
    # the caller's environment (API keys, tokens) is not handed to untrusted code
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    if "LD_LIBRARY_PATH" in os.environ:  # some Python builds need it to start at all
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _kill_group(pgid):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _describe_exit(returncode, stderr, isolation="in_process"):
    if returncode is not None and returncode < 0:
        signum = -returncode
    elif isolation == "bwrap" and returncode is not None and returncode > 128:
        signum = returncode - 128  # bwrap's init reports a child killed by signal N as 128 + N
    else:
        signum = None
    if signum is not None:
        try:
            how = f"killed by {signal.Signals(signum).name}"
        except ValueError:
            how = f"killed by signal {signum}"
    else:
        how = f"exit code {returncode}"
    tail = stderr.decode("utf-8", "replace").strip()[-2000:] if stderr else ""
    return f"Execution failed (no result returned; {how})" + (f": {tail}" if tail else "")


def _system_binds():
    """(bwrap mount arguments for the read-only system: /usr, the merged-/usr links, the interpreter)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # the interpreter and its standard library, wherever they live (pyenv, a venv, /opt/...)
    dirs = {os.path.realpath(d) for d in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                            os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))}
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if d and os.path.isabs(d) and os.path.isdir(d):
            dirs.add(os.path.realpath(d))
    bound = ["/usr"]
    made = set()
    for d in sorted(dirs, key=len):
        if any(d == b or d.startswith(b.rstrip("/") + "/") for b in bound) or d == "/":
            continue
        # parents are created world-traversable (bwrap would copy a 0700 /root), then the bind
        parts = d.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", d, d]
        bound.append(d)
    return args


def _bwrap_argv(bwrap, command, tmpfs_bytes, extra=()):
    """The bwrap command line around `command` (a list, run inside)."""
    argv = [bwrap, "--die-with-parent", "--new-session",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:
        # root: no user namespace (it would map the sandbox to uid 0, which RLIMIT_NPROC does not
        # bind); keep only what the child needs to drop to an unprivileged uid before running code
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    argv += _system_binds()
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(int(tmpfs_bytes)), "--tmpfs", "/tmp",
             *extra, "--chdir", "/tmp", "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
             "--setenv", "LANG", "C.UTF-8", "--setenv", "LC_ALL", "C.UTF-8", "--setenv", "OMP_NUM_THREADS", "1"]
    if os.environ.get("LD_LIBRARY_PATH"):
        argv += ["--setenv", "LD_LIBRARY_PATH", os.environ["LD_LIBRARY_PATH"]]
    return argv + ["--", *command]


def _bwrap_env():
    # bwrap's own processes (its init is pid 1 inside) get nothing worth reading either
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


@functools.lru_cache(maxsize=None)
def _bwrap_problem(bwrap: Optional[str]) -> Optional[str]:
    """Why bwrap cannot isolate a run here, or None when it can (tried once per process)."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux namespaces; this is {sys.platform}"
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed (not found on PATH)"
    argv = _bwrap_argv(bwrap, [sys.executable, "-I", "-S", "-c", "pass"], 1024 * 1024)
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=_bwrap_env(), timeout=30,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{bwrap} does not run: {e}"
    if p.returncode != 0:
        return f"{bwrap} cannot create its sandbox here: {p.stderr.decode('utf-8', 'replace').strip()[-500:]}"
    return None


def resolve_isolation(isolation: str = "auto") -> str:
    """"bwrap" or "in_process" for the setting; raises SandboxUnavailableError rather than run unisolated.

    "auto" is the strongest isolation this machine has, and refuses where that is none: today
    bwrap, on Linux. "in_process" must be asked for by name."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "in_process":
        return "in_process"
    problem = _bwrap_problem(shutil.which("bwrap"))
    if problem:
        raise SandboxUnavailableError(
            f"{CONFIG_KEY}={isolation}: {problem}. Model-written code runs only under OS isolation unless "
            f"you opt out: install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
            f"bubblewrap), or set {CONFIG_KEY}=in_process to accept the in-interpreter guard alone, which is "
            f"NOT a security boundary (run it only in a throwaway VM or container).")
    return "bwrap"


def execute_code(code: str, timeout: float = 5.0,
                 maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024,
                 isolation: str = "auto", max_processes: int = MAX_PROCESSES) -> ExecutionResult:
    """Run `code` in a sandboxed child interpreter; never raises for anything the code does.

    isolation: "auto" | "bwrap" | "in_process" (see the module docstring); the result's
    `isolation` says which ran. Raises SandboxUnavailableError when "auto"/"bwrap" cannot be had."""
    if sys.platform == "win32":
        raise NotImplementedError("execute_code needs POSIX signals and process groups (Linux or macOS)")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if maximum_memory_bytes is not None and maximum_memory_bytes <= 0:
        raise ValueError(f"maximum_memory_bytes must be None or > 0, got {maximum_memory_bytes!r}")
    if max_processes < 2:
        raise ValueError(f"max_processes must be >= 2 (the run's init and the program), got {max_processes!r}")
    isolation = resolve_isolation(isolation)
    # request.json and result.json talk to the child through files, not pipes, so that a
    # grandchild that inherited a pipe cannot keep us waiting
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanopipe-sandbox-"))
    try:
        request = {"code": code, "timeout": timeout, "maximum_memory_bytes": maximum_memory_bytes}
        if isolation == "bwrap":
            request.update(max_processes=max_processes, nofile=NOFILE,
                           uid=_SANDBOX_UID_BASE + int.from_bytes(os.urandom(3), 'little') if os.geteuid() == 0 else None)
        with open(os.path.join(workdir, "request.json"), "w", encoding="utf-8") as f:
            json.dump(request, f)
        result_path = os.path.join(workdir, "result.json")
        open(result_path, "w").close()
        if isolation == "bwrap":
            # /sandbox (0700, root's or the caller's): the request, the result file and this file,
            # opened before the drop to the run's uid; the program works in a private tmpfs /tmp
            extra = ["--perms", "0700", "--dir", "/sandbox",
                     "--ro-bind", os.path.join(workdir, "request.json"), "/sandbox/request.json",
                     "--bind", result_path, "/sandbox/result.json",
                     "--ro-bind", os.path.abspath(__file__), "/sandbox/sandbox.py"]
            argv = _bwrap_argv(shutil.which("bwrap"), [sys.executable, "-I", "-S", "/sandbox/sandbox.py", "--bwrap"],
                               maximum_memory_bytes or TMPFS_BYTES, extra)
            cwd, env = workdir, _bwrap_env()
        else:
            run_dir = os.path.join(workdir, "run")  # the program's cwd; the guard allows writes only there
            os.mkdir(run_dir)
            # -I: ignore PYTHON* variables, user site and the script's dir; -S: no site-packages
            # (faster start, and the program sees the standard library only, as HumanEval needs)
            argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), workdir]
            cwd, env = run_dir, _child_env(run_dir)
        with open(os.path.join(workdir, "stderr.txt"), "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    cwd=cwd, env=env, close_fds=True,
                                    start_new_session=True)  # own process group: one killpg reaches it all
        try:
            proc.wait(timeout=timeout + KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)  # the child is not reaped yet, so its group id cannot be reused
            proc.wait()
            return ExecutionResult(success=False, stdout="", stderr="", error="Execution timed out (process killed)",
                                   timeout=True, isolation=isolation)
        except BaseException:  # e.g. Ctrl-C in the caller: do not leave the child running
            _kill_group(proc.pid)
            proc.wait()
            raise
        _kill_group(proc.pid)  # anything that escaped the guard and outlived the child (in_process)
        result = None
        with contextlib.suppress(OSError, ValueError):
            if os.path.getsize(result_path) <= MAX_RESULT_BYTES:
                with open(result_path, "r", encoding="utf-8") as f:
                    result = json.load(f)
        if not isinstance(result, dict) or "success" not in result:
            rc = proc.returncode
            if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) and (rc < 0 or isolation == "bwrap"):
                return ExecutionResult(success=False, stdout="", stderr="", timeout=True, isolation=isolation,
                                       error="Execution timed out (CPU time limit, process killed)")
            # nanochat flags this as timeout=True; it is not one, so we say what happened instead
            with open(os.path.join(workdir, "stderr.txt"), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4000))
                err_tail = f.read()
            return ExecutionResult(success=False, stdout="", stderr="",
                                   error=_describe_exit(proc.returncode, err_tail, isolation), isolation=isolation)
        try:
            return ExecutionResult(success=bool(result["success"]), stdout=str(result["stdout"]),
                                   stderr=str(result["stderr"]), error=result["error"],
                                   timeout=bool(result["timeout"]), memory_exceeded=bool(result["memory_exceeded"]),
                                   isolation=isolation)
        except (KeyError, TypeError):
            return ExecutionResult(success=False, stdout="", stderr="", error="Execution failed (malformed result)",
                                   isolation=isolation)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -----------------------------------------------------------------------------
# Child side (runs in the sandboxed interpreter)

class TimeoutException(Exception):
    pass


class WriteOnlyStringIO(io.StringIO):
    """stdin for the sandbox: any read raises instead of blocking."""

    def read(self, *args, **kwargs):
        raise IOError

    def readline(self, *args, **kwargs):
        raise IOError

    def readlines(self, *args, **kwargs):
        raise IOError

    def readable(self, *args, **kwargs):
        return False


class redirect_stdin(contextlib._RedirectStream):  # type: ignore[name-defined]
    _stream = "stdin"


@contextlib.contextmanager
def capture_io():
    stdout_capture = io.StringIO()
    stderr_capture = io.StringIO()
    with contextlib.redirect_stdout(stdout_capture), contextlib.redirect_stderr(stderr_capture), \
            redirect_stdin(WriteOnlyStringIO()):
        yield stdout_capture, stderr_capture


@contextlib.contextmanager
def time_limit(seconds: float):
    def signal_handler(signum, frame):
        raise TimeoutException("Timed out!")
    signal.signal(signal.SIGALRM, signal_handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _deny(what):
    raise PermissionError(errno.EACCES, f"disabled in the sandbox: {what}")


def _restrict_writes(root):
    """Allow file creation/writes only under `root` (reads stay allowed everywhere)."""
    import _io
    import posix
    real_open, real_os_open, real_mkdir, real_fileio = _io.open, os.open, os.mkdir, _io.FileIO
    realpath, join, isabs = os.path.realpath, os.path.join, os.path.isabs

    def check(path, write):
        if not write or isinstance(path, int):  # an fd was already vetted when it was opened
            return
        p = os.fsdecode(os.fspath(path))
        p = realpath(p if isabs(p) else join(root, p))  # cwd is root and chdir is disabled
        if not (p == root or p.startswith(root + os.sep)):
            raise PermissionError(errno.EACCES, "sandbox: writing outside the sandbox's temp dir is not allowed", str(path))

    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, isinstance(mode, str) and any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            check(file, isinstance(mode, str) and any(c in mode for c in "wax+"))
            super().__init__(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and dir_fd is not None:
            _deny("os.open for writing with dir_fd")
        check(path, bool(flags & write_flags))
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            _deny("os.mkdir with dir_fd")
        check(path, True)
        return real_mkdir(path, mode)

    import builtins
    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = posix.open = guarded_os_open
    os.mkdir = posix.mkdir = guarded_mkdir
    tempfile.tempdir = root


def _disable_network():
    import _socket
    import socket

    def no_network(*args, **kwargs):
        _deny("network access")

    class NoSocket(socket.socket):  # still subclassable, so modules like ssl import fine
        def __init__(self, *args, **kwargs):
            _deny("network access (socket)")

    class NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            _deny("network access (socket)")

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    for module in (socket, _socket):
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, no_network)


# os functions nanochat's guard sets to None, plus process creation/exec and signalling that it
# leaves reachable (exec* replaces the child with any program; posix.* bypasses os.*)
_DISABLED_OS = (
    "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
    "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
    "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "posix_spawn", "posix_spawnp",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "popen",
    "register_at_fork", "symlink", "link", "mkfifo", "mknod", "ftruncate", "setsid", "setpgid",
)


def reliability_guard(maximum_memory_bytes: Optional[int] = None, root: Optional[str] = None):
    """Disable destructive functions in this (throwaway) process. Irreversible: call only in the child."""
    if maximum_memory_bytes is not None and platform.uname().system != "Darwin":
        import resource
        for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK, resource.RLIMIT_FSIZE):
            hard = resource.getrlimit(limit)[1]  # an unprivileged process may not raise its hard limit
            value = maximum_memory_bytes if hard == resource.RLIM_INFINITY else min(maximum_memory_bytes, hard)
            resource.setrlimit(limit, (value, value))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-large file write fails with EFBIG, not a kill
    faulthandler.disable()

    import builtins
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"

    if root is not None:
        _restrict_writes(root)
    _disable_network()

    import posix
    for name in _DISABLED_OS:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, None)
    import shutil as _shutil
    _shutil.rmtree = None
    _shutil.move = None
    _shutil.chown = None
    import subprocess as _subprocess
    _subprocess.Popen = None
    import _posixsubprocess
    _posixsubprocess.fork_exec = None
    if hasattr(signal, "pidfd_send_signal"):
        signal.pidfd_send_signal = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _truncate(text):
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    return text[:MAX_OUTPUT_CHARS] + f"\n... [truncated {len(text) - MAX_OUTPUT_CHARS} chars]"


def _unsafe_execute(code, timeout, maximum_memory_bytes, root):
    reliability_guard(maximum_memory_bytes, root)
    result = {"success": False, "stdout": "", "stderr": "", "timeout": False, "memory_exceeded": False, "error": None}
    exec_globals = {}
    try:
        with capture_io() as (stdout_capture, stderr_capture):
            with time_limit(timeout):
                exec(code, exec_globals)
        result.update(success=True, stdout=_truncate(stdout_capture.getvalue()),
                      stderr=_truncate(stderr_capture.getvalue()))
    except TimeoutException:
        result.update(timeout=True, error="Execution timed out")
    except MemoryError as e:
        result.update(memory_exceeded=True, error=f"Memory limit exceeded: {e}")
    except BaseException as e:  # SystemExit and failed `check` asserts included
        result.update(error=f"{type(e).__name__}: {e}"[:MAX_OUTPUT_CHARS])
    exec_globals.clear()  # free the program's objects before encoding the result under the memory cap
    return result


def _apply_os_limits(request):
    """bwrap: the kernel's limits for this process and everything it starts (set before the uid drop)."""
    import resource
    mem = request["maximum_memory_bytes"]
    cpu = int(math.ceil(request["timeout"])) + 1  # CPU seconds; the wall clock is enforced from outside
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1),
              (resource.RLIMIT_NPROC, request["max_processes"], request["max_processes"]),
              (resource.RLIMIT_NOFILE, request["nofile"], request["nofile"]),
              (resource.RLIMIT_FSIZE, mem or TMPFS_BYTES, mem or TMPFS_BYTES),
              (resource.RLIMIT_CORE, 0, 0)]
    if mem is not None:
        limits += [(resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_DATA, mem, mem)]
    for which, soft, hard in limits:
        old = resource.getrlimit(which)[1]
        if old != resource.RLIM_INFINITY:
            soft, hard = min(soft, old), min(hard, old)
        resource.setrlimit(which, (soft, hard))


def _drop_privileges(uid):
    """root inside bwrap (no user namespace): become `uid`, which owns nothing, with no capabilities."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
        raise RuntimeError("could not drop to the sandbox uid")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("the sandbox uid can become root again")


def _child_main(workdir):
    with open(os.path.join(workdir, "request.json"), "r", encoding="utf-8") as f:
        request = json.load(f)
    # opened before the guard; the program's own fd-level writes to stdout/stderr go nowhere
    result_file = open(os.path.join(workdir, "result.json"), "w", encoding="utf-8")
    _run_and_report(request, result_file, os.path.realpath(os.getcwd()))


def _child_main_bwrap():
    """Inside bwrap: limits, uid drop (as root), then the guarded run in /tmp."""
    with open("/sandbox/request.json", "r", encoding="utf-8") as f:
        request = json.load(f)
    result_file = open("/sandbox/result.json", "w", encoding="utf-8")

    def prepare():
        _apply_os_limits(request)
        if os.getuid() == 0:  # never run the program as root, even a namespaced one
            if request.get("uid") is None:
                raise RuntimeError("running as root without a uid to drop to")
            _drop_privileges(request["uid"])
    _run_and_report(request, result_file, "/tmp", prepare)


def _run_and_report(request, result_file, root, prepare=None):
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        if prepare is not None:
            prepare()
        result = _unsafe_execute(request["code"], request["timeout"], request["maximum_memory_bytes"], root)
    except BaseException as e:  # the guard itself failed: report it rather than die silently (no code ran)
        result = {"success": False, "stdout": "", "stderr": "", "timeout": False, "memory_exceeded": False,
                  "error": f"sandbox setup failed: {type(e).__name__}: {e}"}
    json.dump(result, result_file)
    result_file.close()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "--bwrap":
        _child_main_bwrap()
    else:
        _child_main(sys.argv[1])
