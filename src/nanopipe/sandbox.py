"""Sandboxed execution of untrusted, model-written Python (HumanEval grading).

    result = execute_code("print(1)", timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024)
    result.success, result.stdout  # True, "1\\n"

Each program runs in a fresh interpreter (`python -I -S` on this very file, which imports only
the standard library; the program can import the standard library only) in its own session,
in a fresh temp dir, with a minimal environment, and:
- a wall-clock limit: SIGALRM inside the child raises TimeoutException; from outside, the whole
  process group is SIGKILLed at timeout + 1 s whatever the child does;
- RLIMIT_AS/DATA/STACK (and FSIZE) = maximum_memory_bytes (not on macOS): allocation fails with
  MemoryError, reported as memory_exceeded;
- nanochat's reliability guard (destructive os/shutil functions, subprocess, exit/quit/help
  disabled, some imports blocked), plus: no fork/exec/spawn/kill through posix either, no
  sockets, no file writes outside the temp dir.
This stops accidents (deleted files, fork bombs, hangs, runaway memory, stray connections) and
keeps the caller's process unharmed. It is NOT a security boundary: Python-level guards can be
undone by a determined program (ctypes, introspection); run hostile code in a VM or container.

Why not nanochat's multiprocessing.Process: forking a large PyTorch/CUDA process and then
lowering RLIMIT_AS below its already-mapped size makes every allocation in the child fail, and
the spawn/forkserver methods re-import the caller's __main__ (slow, side effects). A fresh
interpreter costs ~20 ms and has none of these problems.
"""
import contextlib
import errno
import faulthandler
import io
import json
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


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False

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


def _describe_exit(returncode, stderr):
    if returncode is not None and returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    tail = stderr.decode("utf-8", "replace").strip()[-2000:] if stderr else ""
    return f"Execution failed (no result returned; {how})" + (f": {tail}" if tail else "")


def execute_code(code: str, timeout: float = 5.0,
                 maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024) -> ExecutionResult:
    """Run `code` in a sandboxed child interpreter; never raises for anything the code does."""
    if sys.platform == "win32":
        raise NotImplementedError("execute_code needs POSIX signals and process groups (Linux or macOS)")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if maximum_memory_bytes is not None and maximum_memory_bytes <= 0:
        raise ValueError(f"maximum_memory_bytes must be None or > 0, got {maximum_memory_bytes!r}")
    # workdir/request.json and result.json talk to the child through files, not pipes, so that
    # a grandchild that inherited a pipe cannot keep us waiting; the program runs in workdir/run
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanopipe-sandbox-"))
    try:
        with open(os.path.join(workdir, "request.json"), "w", encoding="utf-8") as f:
            json.dump({"code": code, "timeout": timeout, "maximum_memory_bytes": maximum_memory_bytes}, f)
        run_dir = os.path.join(workdir, "run")
        os.mkdir(run_dir)
        with open(os.path.join(workdir, "stderr.txt"), "wb") as err:
            proc = subprocess.Popen(
                # -I: ignore PYTHON* variables, user site and the script's dir; -S: no site-packages
                # (faster start, and the program sees the standard library only, as HumanEval needs)
                [sys.executable, "-I", "-S", os.path.abspath(__file__), workdir],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                cwd=run_dir, env=_child_env(run_dir), close_fds=True,
                start_new_session=True,  # own process group: one killpg reaches anything it spawned
            )
        try:
            proc.wait(timeout=timeout + KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)  # the child is not reaped yet, so its group id cannot be reused
            proc.wait()
            return ExecutionResult(success=False, stdout="", stderr="",
                                   error="Execution timed out (process killed)", timeout=True)
        except BaseException:  # e.g. Ctrl-C in the caller: do not leave the child running
            _kill_group(proc.pid)
            proc.wait()
            raise
        _kill_group(proc.pid)  # anything that escaped the guard and outlived the child
        try:
            with open(os.path.join(workdir, "result.json"), "r", encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError):
            result = None
        if not isinstance(result, dict) or "success" not in result:
            # nanochat flags this as timeout=True; it is not one, so we say what happened instead
            with open(os.path.join(workdir, "stderr.txt"), "rb") as f:
                err_tail = f.read()[-4000:]
            return ExecutionResult(success=False, stdout="", stderr="", error=_describe_exit(proc.returncode, err_tail))
        return ExecutionResult(success=bool(result["success"]), stdout=result["stdout"], stderr=result["stderr"],
                               error=result["error"], timeout=bool(result["timeout"]),
                               memory_exceeded=bool(result["memory_exceeded"]))
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


def _child_main(workdir):
    with open(os.path.join(workdir, "request.json"), "r", encoding="utf-8") as f:
        request = json.load(f)
    # opened before the guard; the program's own fd-level writes to stdout/stderr go nowhere
    result_file = open(os.path.join(workdir, "result.json"), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        result = _unsafe_execute(request["code"], request["timeout"], request["maximum_memory_bytes"],
                                 os.path.realpath(os.getcwd()))
    except BaseException as e:  # the guard itself failed: report it rather than die silently
        result = {"success": False, "stdout": "", "stderr": "", "timeout": False, "memory_exceeded": False,
                  "error": f"sandbox setup failed: {type(e).__name__}: {e}"}
    json.dump(result, result_file)
    result_file.close()
    os._exit(0)


if __name__ == "__main__":
    _child_main(sys.argv[1])
