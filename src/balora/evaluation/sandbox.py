"""Run untrusted Python programs (model-written code) in separate, resource-limited processes.

Defences, strongest first; the OS-level ones are the real protection, the Python-level guard is
only defence in depth (any program can undo it, e.g. through ``ctypes`` or ``posix``):

1. **Another user.** When the harness runs as root (as here and in CI) each worker slot runs its
   programs as its own unprivileged uid (``uid_base + slot``, default 65000+, unused by any
   account; no supplementary groups). Root ignores RLIMIT_NPROC and file permissions, a private
   uid does not: the program cannot write or delete anything it does not own outside its
   directory, cannot signal the harness or other slots, and every process it leaves behind can
   be found and killed by uid.
2. **Namespaces** (``namespaces=True``, set up by the bootstrap before it drops to the uid):
   a new IPC namespace (SysV shared memory, semaphores, message queues and POSIX message queues
   die with the program's last process), a new network namespace (no interface but a down
   loopback: nothing can be connected to, a listening socket cannot be reached, abstract Unix
   sockets are per namespace), and a private mount namespace in which one ``tmpfs`` of
   ``SandboxLimits.disk_bytes`` / ``disk_files`` holds the working directory (same path) and
   fresh, empty ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock`` -- the host's are hidden, not
   written, and the tmpfs goes with the namespace. Without root, a user namespace mapping only
   the harness's own uid comes first and every capability is dropped afterwards (as ``bwrap``
   does). Whatever the kernel refuses is skipped; ``ExecutionResult.isolation`` says what was
   active and a warning is logged once per missing combination.
3. **Resource limits** (``resource.setrlimit`` in the child before the program starts): CPU
   seconds, address space, file size, process count, open files, no core dumps.
4. **Process hygiene.** A new session/process group per program, killed as a whole on timeout
   and after every run, then a by-uid sweep for anything that escaped the group (``setsid``,
   double fork); a fresh temporary working directory (also ``HOME`` and ``TMPDIR``) removed
   afterwards; after every run, whether or not the namespaces were there, removal of anything
   the uid left in ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock`` (and world-writable
   folders in them) and of every SysV IPC object it owns or created; without a mount namespace
   a watcher kills the group once the working directory exceeds the disk cap (polled, so after
   the fact);
   a scrubbed environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` only); ``close_fds``;
   stdin from ``/dev/null``; output read incrementally and capped, so a flood of prints cannot
   exhaust the harness's memory; a wall-clock timeout.
5. **Interpreter flags** ``-I -S -B``: no ``PYTHON*`` variables, no user or site packages (no
   ``.pth`` code runs; programs get the standard library only), no bytecode writes.
6. **Python guard** (``guard=True``): ``os.fork/kill/system/exec*/spawn*``, ``subprocess`` and
   ``ctypes`` disabled; deleting, renaming or opening for writing outside the working directory
   refused (``open``, ``os.open`` and the originals behind them, ``posix.open``, ``_io.open``,
   ``io.FileIO``). Not airtight: object introspection can reach unpatched functions.

Why a bootstrap instead of ``preexec_fn`` or ``Popen(user=...)``: programs are started from a
thread pool, and ``preexec_fn`` runs Python in the forked child of a multi-threaded process, which
can deadlock; ``user=`` makes ``subprocess`` use ``fork`` instead of ``vfork``, which costs ~40 ms
per program when the harness has torch loaded. So the child starts as a plain ``vfork``/``exec``
of the interpreter running a small trusted bootstrap that sets the limits, drops to the slot uid
(``setresuid``, no way back), and only then compiles and executes the program. An unprivileged
process can lower, never raise, its hard limits.

Not covered: files outside the private directories stay readable as far as their permissions
let any user read them (the rest of the filesystem is not hidden); Unix sockets with a path are
reachable per their file permissions; tmpfs pages are memory (at most ``disk_bytes`` per worker)
and do not count against RLIMIT_AS; no PID namespace (other processes are visible in ``/proc``,
though not signalable); CPU/memory use of the harness itself. Without root there is no uid
switch: RLIMIT_NPROC then counts all of the user's processes, the by-uid sweeps are off, and
without a user namespace the filesystem is as writable as it is for that user.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["ExecutionResult", "Sandbox", "SandboxLimits", "run_program", "run_programs"]

log = logging.getLogger(__name__)

SANDBOX_UID_BASE = 65000  # 65000-65533 is reserved and unallocated on Debian-style systems
_SETUP_ERROR_RC = 121
_SETUP_ERROR_TAG = "balora-sandbox-setup-error"
_EXIT_GRACE_S = 0.5  # how long orphans may keep the output pipes open after the program exits
# World-writable places: private (empty tmpfs) inside the mount namespace, swept by uid after
# every run in any case.
_STRAY_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SYSV_IPC = {"shm": "shmctl", "sem": "semctl", "msg": "msgctl"}  # /proc/sysvipc file -> remover
_DISK_POLL_S = 0.1  # fallback disk watcher (no mount namespace): how often the work dir is sized
_UID_RANGE = 512  # uids uid_base .. uid_base + 511 may be leased

# Runs in the child, trusted, before the program: limits, then the optional guard, then the
# program as __main__. Kept free of f-strings/annotations so any Python 3 on the host can run it.
_BOOTSTRAP = r'''
import os, resource, sys
_cfg = dict(zip(("cpu", "memory", "fsize", "nproc", "nofile", "uid", "guard", "ns", "disk",
                 "files", "report"), map(int, sys.argv[1:12])))
_private = [d for d in sys.argv[12:] if d]

def _limit(name, soft, hard=None):
    res = getattr(resource, name)
    hard = soft if hard is None else hard
    cur_hard = resource.getrlimit(res)[1]
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(res, (soft, hard))

def _namespaces(iso, uid, disk, files, private, source):
    # New IPC and network namespaces (SysV/POSIX IPC objects and sockets die with the program;
    # only a down loopback), and a private mount namespace: one tmpfs of ``disk`` bytes holds the
    # working directory and fresh, empty /tmp, /var/tmp, /dev/shm, /run/lock. Without root, a
    # user namespace first (mapping only our own uid), all capabilities dropped at the end.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]

    def unshare(flag):
        return libc.unshare(ctypes.c_int(flag)) == 0

    def mount(src, target, fstype, flags, data=None):
        enc = lambda v: None if v is None else v.encode()
        if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), target)

    userns = os.geteuid() != 0
    if userns:
        real_uid, real_gid = os.getuid(), os.getgid()
        if not unshare(0x10000000):  # CLONE_NEWUSER
            return
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (real_uid, real_uid)),
                           ("gid_map", "%d %d 1" % (real_gid, real_gid))):
            with open("/proc/self/" + name, "w") as fh:
                fh.write(text)
    iso["ipc"] = unshare(0x08000000)  # CLONE_NEWIPC
    iso["network"] = unshare(0x40000000)  # CLONE_NEWNET
    if unshare(0x00020000):  # CLONE_NEWNS
        nosuid_nodev, bind, rec, private_prop = 2 | 4, 4096, 16384, 1 << 18
        work = os.path.realpath(os.getcwd())
        mounted = []
        try:
            mount(None, "/", None, rec | private_prop)  # nothing we mount reaches the host
            mount("balora-sandbox", work, "tmpfs", nosuid_nodev,
                  "size=%d,nr_inodes=%d,mode=0755" % (disk, files))
            mounted.append(work)
            stage = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            at = lambda name: "/proc/self/fd/%d/%s" % (stage, name)
            owner = uid if uid >= 0 else os.getuid()
            os.mkdir(at("work"), 0o700)
            os.chown(at("work"), owner, owner)
            for i, target in enumerate(private):
                if not os.path.isdir(target):  # e.g. inside one already made private
                    continue
                os.mkdir(at("p%d" % i))
                os.chmod(at("p%d" % i), 0o1777)
                mount(at("p%d" % i), target, None, bind)
                mounted.append(target)
            # Under one of the private dirs: recreate its path there; else stack onto the stage.
            os.makedirs(work, 0o700, exist_ok=True)
            mount(at("work"), work, None, bind)
            mounted.append(work)
            os.close(stage)
            os.chdir(work)
            with open("program.py", "wb") as fh:
                fh.write(source)
            os.chown("program.py", owner, owner)
            iso["mount"] = True
        except OSError:  # e.g. mount(2) refused: undo, run in the host's directory
            for target in reversed(mounted):
                libc.umount2(target.encode(), 2)  # MNT_DETACH
            os.chdir(work)
    if userns:  # drop every capability the user namespace gave us (no unmounting /tmp)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")

_iso = {"ipc": False, "network": False, "mount": False}
try:
    _limit("RLIMIT_CPU", _cfg["cpu"], _cfg["cpu"] + 1)
    _limit("RLIMIT_AS", _cfg["memory"])
    _limit("RLIMIT_FSIZE", _cfg["fsize"])
    _limit("RLIMIT_NPROC", _cfg["nproc"])
    _limit("RLIMIT_NOFILE", _cfg["nofile"])
    _limit("RLIMIT_CORE", 0)
    with open("program.py", "rb") as _fh:
        _source = _fh.read()
    if _cfg["ns"]:
        try:
            _namespaces(_iso, _cfg["uid"], _cfg["disk"], _cfg["files"], _private, _source)
        finally:
            for _name in ("ctypes", "ctypes._endian", "_ctypes"):
                sys.modules.pop(_name, None)
    if _cfg["uid"] >= 0:  # all three ids, so nothing can switch back; capabilities go with root
        os.setgroups([])
        os.setresgid(_cfg["uid"], _cfg["uid"], _cfg["uid"])
        os.setresuid(_cfg["uid"], _cfg["uid"], _cfg["uid"])
    if _cfg["report"] >= 0:
        os.write(_cfg["report"], " ".join("%s=%d" % kv for kv in _iso.items()).encode())
        os.close(_cfg["report"])
except (OSError, ValueError) as _exc:
    sys.stderr.write("%s: %r\n" % ("''' + _SETUP_ERROR_TAG + r'''", _exc))
    sys.exit(''' + str(_SETUP_ERROR_RC) + r''')
# Outside the try: a program that does not compile is the program's failure, not the harness's.
_code = compile(_source, "program.py", "exec")

def _guard(root):
    # Only modules that are already loaded or built in: the guard must not slow every run.
    import _io, _posixsubprocess, builtins, io, os, posix
    def deny(name):
        def denied(*args, **kwargs):
            raise PermissionError(name + " is disabled in the sandbox")
        return denied
    for name in ("kill", "killpg", "system", "popen", "fork", "forkpty", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp", "setuid", "setgid", "chroot", "setsid"):
        if hasattr(os, name):
            setattr(os, name, deny("os." + name))
    # subprocess and multiprocessing's spawn both end in this C function.
    _posixsubprocess.fork_exec = deny("subprocess")
    sys.modules["ctypes"] = None
    sys.modules["_ctypes"] = None

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            return None
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
        return os.path.realpath(path)

    def check(path, dir_fd=None, what="access"):
        real = resolve(path, dir_fd)
        if real is not None and real != root and not real.startswith(root + os.sep):
            raise PermissionError("sandbox: %s outside the working directory: %r" % (what, path))

    def one_path(func, what):
        def wrapper(path, *args, **kwargs):
            check(path, kwargs.get("dir_fd"), what)
            return func(path, *args, **kwargs)
        return wrapper

    def two_paths(func, what):
        def wrapper(src, dst, *args, **kwargs):
            check(src, kwargs.get("src_dir_fd"), what)
            check(dst, kwargs.get("dst_dir_fd"), what)
            return func(src, dst, *args, **kwargs)
        return wrapper

    for name in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "chown"):
        setattr(os, name, one_path(getattr(os, name), name))
    for name in ("rename", "replace", "link"):
        setattr(os, name, two_paths(getattr(os, name), name))
    # shutil.rmtree/move look these os functions up at call time, so they are covered too.

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open, real_open, real_file_io = os.open, builtins.open, _io.FileIO

    def os_open(path, flags, *args, **kwargs):
        if flags & write_flags:
            check(path, kwargs.get("dir_fd"), "write")
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file, None, "write")
        return real_open(file, mode, *args, **kwargs)

    class GuardedFileIO(real_file_io):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                check(file, None, "write")
            super().__init__(file, mode, *args, **kwargs)

    # os.open is posix.open and open is _io.open: patch the originals too, or ``import posix``
    # walks around the guard.
    os.open = posix.open = os_open
    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO

if _cfg["guard"]:
    _guard(os.path.realpath(os.getcwd()))
del _guard, _limit, _namespaces, _cfg, _source, _iso
sys.argv = ["program.py"]
exec(_code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``cpu_seconds=None`` means ceil(timeout) + 1."""

    cpu_seconds: int | None = None
    memory_bytes: int = 2 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 32  # per slot uid (threads count too); see the module doc without root
    max_open_files: int = 64
    output_bytes: int = 64 << 10  # kept per stream; the rest is read and dropped
    disk_bytes: int = 64 << 20  # all files written: work dir + private /tmp, /var/tmp, /dev/shm...
    disk_files: int = 4096  # files and directories in that space (tmpfs inodes)

    def __post_init__(self) -> None:
        if self.disk_bytes <= 0 or self.disk_files <= 0:
            raise ValueError(f"disk_bytes and disk_files must be positive, got {self.disk_bytes}, "
                             f"{self.disk_files}")


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: status is "passed" (exit 0), "failed" (non-zero exit or killed by
    a signal other than the CPU limit), "timeout" (wall or CPU time) or "error" (the harness could
    not run it)."""

    status: str
    returncode: int | None
    duration: float
    stdout: str
    stderr: str
    truncated: bool = False
    # Which protections were active: user (own uid), ipc, network, mount (private /tmp & co. and
    # the tmpfs disk cap), guard. See the module doc for what each means.
    isolation: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _world_usable(path: str) -> bool:
    """Whether a user with no special rights can reach and run ``path``."""
    path = os.path.realpath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & 0o001:
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & 0o001:
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)


class Sandbox:
    """Runs programs with the defences in the module doc; ``max_workers`` at a time.

    ``switch_user`` defaults to "running as root". ``python`` defaults to this interpreter when
    the sandbox uid can use it (a pyenv under ``/root`` is out of its reach), else the first
    usable ``python3`` on ``/usr/local/bin:/usr/bin:/bin``.
    """

    def __init__(self, limits: SandboxLimits | None = None, *, timeout: float = 10.0,
                 max_workers: int | None = None, guard: bool = True,
                 switch_user: bool | None = None, uid_base: int = SANDBOX_UID_BASE,
                 python: str | None = None, namespaces: bool = True) -> None:
        self.limits = limits or SandboxLimits()
        self.timeout = timeout
        self.max_workers = max(1, max_workers or os.cpu_count() or 1)
        self.guard = guard
        self.switch_user = os.geteuid() == 0 if switch_user is None else switch_user
        if self.switch_user and os.geteuid() != 0:
            raise PermissionError("switch_user=True needs root")
        self.uid_base = uid_base
        self.namespaces = namespaces
        self._python = python
        self._python_lock = threading.Lock()
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.max_workers):
            self._slots.put(slot)

    # ------------------------------------------------------------ public

    def run(self, source: str, *, timeout: float | None = None) -> ExecutionResult:
        """Run one program (its text) and wait for the result."""
        timeout = self.timeout if timeout is None else timeout
        slot = self._slots.get()
        try:
            with self._lease(slot) as uid:
                return self._run(source, timeout, uid)
        finally:
            self._slots.put(slot)

    def run_many(self, sources: Sequence[str], *, timeout: float | None = None
                 ) -> list[ExecutionResult]:
        """Run programs ``max_workers`` at a time; results in input order."""
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(lambda s: self.run(s, timeout=timeout), sources))

    def interpreter(self) -> str:
        """The interpreter programs run with (resolved once, probing as a sandbox uid)."""
        slot = self._slots.get()
        try:
            with self._lease(slot) as uid:
                return self._interpreter(uid)
        finally:
            self._slots.put(slot)

    # ------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _lease(self, slot: int) -> Iterator[int | None]:
        """A sandbox uid held exclusively -- across threads, Sandbox objects and processes (two
        harnesses, pytest-xdist) -- because the cleanup sweeps kill and delete by uid."""
        if not self.switch_user:
            yield None
            return
        uid, fd = _lease_uid(self.uid_base + slot % _UID_RANGE, self.uid_base)
        try:
            yield uid
        finally:
            os.close(fd)  # releases the flock

    def _interpreter(self, uid: int | None) -> str:
        with self._python_lock:
            if self._python is None:
                self._python = self._pick_python(uid)
            return self._python

    def _pick_python(self, uid: int | None) -> str:
        candidates = [os.path.realpath(sys.executable)]
        for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
            found = shutil.which("python3", path=folder)
            if found:
                candidates.append(os.path.realpath(found))
        if uid is None:
            return candidates[0]
        for cand in dict.fromkeys(candidates):
            if not _world_usable(cand):
                continue
            probe = self._run("import json, math, re, collections, hashlib, itertools\n", 30.0,
                              uid, python=cand, guard=False)
            if probe.passed:
                return cand
            log.info("sandbox: %s unusable as uid %d: %s", cand, uid, probe.stderr[-300:])
        raise RuntimeError(f"no Python interpreter usable by the sandbox uid among {candidates}; "
                           "pass Sandbox(python=...) with a world-readable interpreter")

    def _run(self, source: str, timeout: float, uid: int | None, *, python: str | None = None,
             guard: bool | None = None) -> ExecutionResult:
        python = python or self._interpreter(uid)
        if uid is not None:  # a crashed earlier harness may have left processes or files behind
            _kill_uid(uid, python)
            _remove_strays(uid)
            _remove_sysv_ipc(uid)
        lim = self.limits
        guard = self.guard if guard is None else guard
        workdir = tempfile.mkdtemp(prefix="balora-sbx-")
        private = [] if not self.namespaces else list(dict.fromkeys(
            os.path.realpath(d) for d in (tempfile.gettempdir(), *_STRAY_DIRS)
            if os.path.isdir(d)))
        start = time.monotonic()
        report_r = report_w = -1
        try:
            program = os.path.join(workdir, "program.py")
            with open(program, "w", encoding="utf-8") as fh:
                fh.write(source)
            if uid is not None:
                os.chown(program, uid, uid)
                os.chown(workdir, uid, uid)
            report_r, report_w = os.pipe()
            os.set_blocking(report_r, False)
            cfg = [lim.cpu_seconds or math.ceil(timeout) + 1, lim.memory_bytes,
                   lim.file_size_bytes, lim.max_processes, lim.max_open_files,
                   -1 if uid is None else uid, int(guard), int(self.namespaces), lim.disk_bytes,
                   lim.disk_files, report_w]
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-S", "-B", "-c", _BOOTSTRAP, *map(str, cfg), *private],
                    cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, close_fds=True, pass_fds=(report_w,),
                    start_new_session=True,
                    env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                         "LANG": "C.UTF-8"},
                )
            except (OSError, subprocess.SubprocessError) as exc:
                return ExecutionResult("error", None, time.monotonic() - start, "",
                                       f"could not start the sandboxed process: {exc}")
            finally:
                os.close(report_w)
            watcher = _DiskWatcher(workdir, lim.disk_bytes, lim.disk_files, report_r)
            try:
                out, err, truncated, timed_out = _collect(proc, start + timeout, lim.output_bytes,
                                                          watcher)
            finally:
                self._kill_everything(proc, uid, python)
            if not watcher.reported:  # every writer is dead now: this cannot block
                watcher.read_report()
            watcher.over_cap(time.monotonic(), final=True)
            duration = time.monotonic() - start
            rc = proc.returncode
        finally:
            if report_r >= 0:
                os.close(report_r)
            _remove_tree(workdir)
            if uid is not None:
                _remove_strays(uid)
                _remove_sysv_ipc(uid)
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        if watcher.exceeded:
            stderr += f"\nbalora-sandbox: {watcher.exceeded}; program killed\n"
        if timed_out or rc == -signal.SIGXCPU:
            status = "timeout"
        elif rc == _SETUP_ERROR_RC and _SETUP_ERROR_TAG in stderr:
            status = "error"
        elif watcher.exceeded:
            status = "failed"
        else:
            status = "passed" if rc == 0 else "failed"
        isolation = {"user": uid is not None, **watcher.isolation, "guard": bool(guard)}
        if status != "error":
            _log_missing_isolation(isolation)
        return ExecutionResult(status, rc, duration, stdout, stderr, truncated, isolation)

    def _kill_everything(self, proc: subprocess.Popen, uid: int | None, python: str) -> None:
        # The leader is not reaped yet (see _collect), so its pid -- the group id -- cannot have
        # been reused by an unrelated process.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group has already exited: nothing to kill
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if uid is not None:
            _kill_uid(uid, python)


class _DiskWatcher:
    """Reads the bootstrap's isolation report; where the child got no mount namespace (hence no
    tmpfs cap), sizes the work dir every ``_DISK_POLL_S`` and flags it once over the cap.

    The fallback watcher is after the fact: a fast writer can exceed the cap by what it writes in
    one polling interval (each file stays under RLIMIT_FSIZE)."""

    def __init__(self, workdir: str, cap_bytes: int, cap_files: int, report_fd: int) -> None:
        self.workdir, self.cap_bytes, self.cap_files = workdir, cap_bytes, cap_files
        self.report_fd = report_fd
        self.isolation = {"ipc": False, "network": False, "mount": False}
        self.reported = False
        self.exceeded: str | None = None
        self._next = 0.0

    def read_report(self) -> None:
        try:
            data = os.read(self.report_fd, 4096)
        except BlockingIOError:
            data = b""
        for item in data.decode("ascii", errors="replace").split():
            key, _, value = item.partition("=")
            if key in self.isolation:
                self.isolation[key] = value == "1"
        self.reported = True

    def over_cap(self, now: float, final: bool = False) -> bool:
        """True (once) when the work dir grew past the cap; only without the tmpfs. ``final``:
        the last look, after the program ended (a fast writer can finish between two polls)."""
        if not self.reported or self.isolation["mount"] or self.exceeded:
            return False
        if now < self._next and not final:
            return False
        self._next = now + _DISK_POLL_S
        size, count = _tree_usage(self.workdir)
        if size > self.cap_bytes or count > self.cap_files:
            self.exceeded = (f"work dir over the disk cap ({size} bytes, {count} entries > "
                             f"{self.cap_bytes} bytes / {self.cap_files} entries)")
            return True
        return False


def _tree_usage(root: str) -> tuple[int, int]:
    size = count = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            count += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            size += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return size, count


def _collect(proc: subprocess.Popen, deadline: float, cap: int, watcher: _DiskWatcher
             ) -> tuple[bytes, bytes, bool, bool]:
    """Read both pipes until EOF, the deadline, or a grace period after the program exits; the
    report pipe as it comes (the disk watcher kills the group when the work dir is too big).

    Returns (stdout, stderr, truncated, timed_out). Never reaps the leader (``WNOWAIT``).
    """
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    truncated = timed_out = False
    exited_at: float | None = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        sel.register(watcher.report_fd, selectors.EVENT_READ)
        while any(fd in sel.get_map() for fd in bufs):
            now = time.monotonic()
            if exited_at is None and _has_exited(proc.pid):
                exited_at = now
            limit = deadline if exited_at is None else min(deadline, exited_at + _EXIT_GRACE_S)
            if now >= limit:
                timed_out = exited_at is None
                break
            if watcher.over_cap(now):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for key, _ in sel.select(timeout=min(limit - now, 0.1)):
                if key.fd == watcher.report_fd:
                    watcher.read_report()
                    sel.unregister(key.fd)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = cap - len(buf)
                if len(chunk) > room:
                    truncated = True
                if room > 0:
                    buf += chunk[:room]
    while not timed_out and not _has_exited(proc.pid):  # pipes closed, process still running
        if time.monotonic() >= deadline:
            timed_out = True
        else:
            time.sleep(0.01)
    return (bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]),
            truncated, timed_out)


def _has_exited(pid: int) -> bool:
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _uid_pids(uid: int) -> list[int]:
    """Live processes of ``uid``. Zombies are skipped: they are already dead and are reaped by
    whoever inherited them (init, for orphans), which the harness cannot hurry."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # exited while we looked
        if state not in (b"Z", b"X"):
            pids.append(int(entry))
    return pids


def _kill_uid(uid: int, python: str) -> None:
    """Kill every process of the sandbox uid, including ones that left the process group.

    ``kill(-1, SIGKILL)`` issued *as that uid* hits all of its processes in one atomic kernel
    pass, so a fork bomb cannot outrun it the way it can outrun a kill-by-pid loop.
    """
    for _ in range(5):
        if not _uid_pids(uid):
            return
        subprocess.run([python, "-I", "-S", "-c", _KILLER, str(uid)], env={}, cwd="/",
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, close_fds=True, timeout=30)
        time.sleep(0.05)
    left = _uid_pids(uid)
    if left:
        log.error("sandbox: processes of uid %d survived the kill sweep: %s", uid, left)


def _lock_dir() -> str:
    """Root-owned, private directory for the uid lease locks. A sandboxed program could plant
    the path in /tmp before the harness creates it; anything not owned by us is replaced."""
    path = os.path.join(tempfile.gettempdir(), "balora-sandbox-locks")
    for _ in range(3):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # normal after the first run; verified below
        st = os.lstat(path)
        if (os.path.isdir(path) and not os.path.islink(path) and st.st_uid == os.geteuid()
                and st.st_mode & 0o077 == 0):
            return path
        log.warning("sandbox: replacing untrusted lock directory %s", path)
        if os.path.isdir(path) and not os.path.islink(path):
            _remove_tree(path)
        else:
            os.unlink(path)
    raise RuntimeError(f"cannot create a private lock directory at {path}")


def _lease_uid(preferred: int, base: int) -> tuple[int, int]:
    """Lock one uid of ``base .. base + _UID_RANGE - 1`` (preferring ``preferred``); returns the
    uid and the fd holding its flock. Waits while every uid is leased."""
    folder = _lock_dir()
    order = [preferred] + [u for u in range(base, base + _UID_RANGE) if u != preferred]
    while True:
        for uid in order:
            fd = os.open(os.path.join(folder, f"{uid}.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                continue  # leased by another run
            return uid, fd
        time.sleep(0.1)


_KILLER = ("import os, signal, sys; uid = int(sys.argv[1]); os.setgroups([]); "
           "os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid); os.kill(-1, signal.SIGKILL)")


def _log_rm_error(func, path, exc_info) -> None:
    log.warning("sandbox: could not remove %s (%s): %s", path, func.__name__, exc_info[1])


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, onerror=_log_rm_error)


def _remove_strays(uid: int) -> None:
    """Delete what the sandbox uid created in the world-writable places (after the fact; the
    private mount namespace normally keeps them untouched). Entries owned by the uid go whole;
    world-writable folders of others are searched, since the uid can create things there too."""
    todo = [(folder, 0) for folder in dict.fromkeys((tempfile.gettempdir(), *_STRAY_DIRS))]
    while todo:
        folder, depth = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if st.st_uid != uid:
                if is_dir and st.st_mode & 0o002 and depth < 8:
                    todo.append((entry.path, depth + 1))
                continue
            log.warning("sandbox: removing %s left behind by uid %d", entry.path, uid)
            if is_dir:
                _remove_tree(entry.path)
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # removed in between: nothing left to do


def _remove_sysv_ipc(uid: int) -> None:
    """Remove the SysV shared memory segments, semaphore sets and message queues the uid owns or
    created in the harness's IPC namespace (after the fact; with an IPC namespace there are none:
    the child's namespace and everything in it die with its last process)."""
    libc = None
    for kind, remover in _SYSV_IPC.items():
        try:
            with open(f"/proc/sysvipc/{kind}", encoding="ascii") as fh:
                header, *rows = fh.read().splitlines()
        except (OSError, ValueError):
            continue
        cols = header.split()
        try:
            id_col, uid_col, cuid_col = cols.index(f"{kind}id" if kind != "msg" else "msqid"), \
                cols.index("uid"), cols.index("cuid")
        except ValueError:
            continue
        for row in rows:
            fields = row.split()
            if uid not in (int(fields[uid_col]), int(fields[cuid_col])):
                continue
            if libc is None:
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
            ipc_id = int(fields[id_col])
            if kind == "sem":
                ok = libc.semctl(ipc_id, 0, 0) == 0  # IPC_RMID
            else:
                ok = getattr(libc, remover)(ipc_id, 0, None) == 0
            log.warning("sandbox: %s SysV %s %d left behind by uid %d",
                        "removed" if ok else "could not remove", kind, ipc_id, uid)


_logged_gaps: set[tuple[str, ...]] = set()
_logged_lock = threading.Lock()


def _log_missing_isolation(isolation: dict[str, bool]) -> None:
    """Warn once per combination about protections that were not active."""
    gaps = tuple(k for k, v in isolation.items() if not v and k != "guard")  # guard: a choice
    with _logged_lock:
        if not gaps or gaps in _logged_gaps:
            return
        _logged_gaps.add(gaps)
    log.warning("sandbox: NOT isolated: %s (see balora.evaluation.sandbox's module doc; "
                "ExecutionResult.isolation tells per run)", ", ".join(gaps))


def run_program(source: str, *, timeout: float = 10.0, **sandbox_kwargs) -> ExecutionResult:
    """Run one program in a fresh :class:`Sandbox` (keyword arguments go to its constructor)."""
    return Sandbox(timeout=timeout, max_workers=1, **sandbox_kwargs).run(source)


def run_programs(sources: Sequence[str], *, timeout: float = 10.0, max_workers: int | None = None,
                 **sandbox_kwargs) -> list[ExecutionResult]:
    """Run programs in parallel (``max_workers`` default: CPU count); results in input order."""
    sandbox = Sandbox(timeout=timeout, max_workers=max_workers, **sandbox_kwargs)
    return sandbox.run_many(sources)
