"""Issue 14 (C): what a sandboxed program leaves behind or reaches outside its run.

Each attack is a tiny program run with the Python guard off (``guard=False``), so that the OS-level
mechanisms are what is tested: namespaces (IPC, network, mount with tmpfs) where the container
allows them, and the after-the-fact sweeps by uid (``namespaces=False``) where it does not.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from balora.evaluation.sandbox import Sandbox, SandboxLimits

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the by-uid sweeps need the uid switch (root)")


@pytest.fixture(scope="module")
def isolated() -> Sandbox:
    return Sandbox(timeout=5.0, max_workers=1, guard=False)


@pytest.fixture(scope="module")
def fallback() -> Sandbox:
    """No namespaces: only the uid switch, rlimits and the post-run sweeps."""
    return Sandbox(timeout=5.0, max_workers=1, guard=False, namespaces=False)


def _require(res, *keys):
    missing = [k for k in keys if not res.isolation.get(k)]
    if missing:
        pytest.skip(f"the container refused {missing}: {res.isolation}")


def _sysv_objects(uid_base: int) -> list[str]:
    """SysV IPC objects in the host namespace owned by (or created by) any sandbox uid."""
    left = []
    for kind in ("shm", "sem", "msg"):
        header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        cols = header.split()
        for row in rows:
            f = row.split()
            if any(uid_base <= int(f[cols.index(c)]) < uid_base + 512 for c in ("uid", "cuid")):
                left.append(f"{kind}: {row}")
    return left


IPC_PROGRAM = """
import ctypes, os, _posixshmem
libc = ctypes.CDLL(None, use_errno=True)
IPC_PRIVATE, IPC_CREAT = 0, 0o1000
shm = [libc.shmget(IPC_PRIVATE, 1 << 20, IPC_CREAT | 0o666) for _ in range(3)]
sem = libc.semget(IPC_PRIVATE, 4, IPC_CREAT | 0o666)
msg = libc.msgget(IPC_PRIVATE, IPC_CREAT | 0o666)
fd = _posixshmem.shm_open("/balora-probe-{tag}", os.O_CREAT | os.O_RDWR, 0o666)
os.ftruncate(fd, 1 << 20)
assert min(shm + [sem, msg]) >= 0, (shm, sem, msg, ctypes.get_errno())
print(shm, sem, msg)
"""


@needs_root
@pytest.mark.parametrize("name", ["isolated", "fallback"])
def test_ipc_objects_do_not_outlive_the_run(name, request):
    sandbox = request.getfixturevalue(name)
    tag = uuid.uuid4().hex
    res = sandbox.run(IPC_PROGRAM.format(tag=tag))
    assert res.passed, res
    assert res.isolation["ipc"] == (name == "isolated") or name == "isolated"
    assert _sysv_objects(sandbox.uid_base) == []
    assert not Path(f"/dev/shm/balora-probe-{tag}").exists()


LOCK_PROGRAM = """
import os
os.makedirs("/run/lock/balora-{tag}/deep", exist_ok=True)
open("/run/lock/balora-{tag}/deep/f", "w").write("x")
open("/run/lock/balora-{tag}.lock", "w").write("x")
open("/var/tmp/balora-{tag}", "w").write("x")
print(sorted(os.listdir("/run/lock")))
"""


@needs_root
@pytest.mark.skipif(not os.path.isdir("/run/lock") or not os.stat("/run/lock").st_mode & 0o002,
                    reason="no world-writable /run/lock here")
@pytest.mark.parametrize("name", ["isolated", "fallback"])
def test_run_lock_and_var_tmp_entries_do_not_survive(name, request):
    sandbox = request.getfixturevalue(name)
    tag = uuid.uuid4().hex
    res = sandbox.run(LOCK_PROGRAM.format(tag=tag))
    assert res.passed, res
    if res.isolation["mount"]:  # a private, empty /run/lock: the host's entries are not seen
        assert res.stdout.strip() == f"['balora-{tag}', 'balora-{tag}.lock']"
    assert not [p for p in os.listdir("/run/lock") if tag in p]
    assert not Path(f"/var/tmp/balora-{tag}").exists()


DISK_PROGRAM = """
import os
written = 0
try:
    for i in range(40):  # 40 x 1 MiB files, each under RLIMIT_FSIZE; half of it into /tmp
        with open(("/tmp/f%d" if i % 2 else "f%d") % i, "wb") as fh:
            fh.write(b"x" * (1 << 20))
        written += 1 << 20
finally:
    print(written, flush=True)
"""


@pytest.mark.parametrize("namespaces", [True, False])
def test_disk_cap_stops_a_writer(namespaces):
    cap = 8 << 20
    sandbox = Sandbox(SandboxLimits(disk_bytes=cap, file_size_bytes=2 << 20), timeout=5.0,
                      max_workers=1, guard=False, namespaces=namespaces)
    res = sandbox.run(DISK_PROGRAM)
    assert res.status == "failed", res
    if res.isolation["mount"]:  # tmpfs: ENOSPC at the cap, counted over work dir and /tmp
        assert "No space left on device" in res.stderr
        assert int(res.stdout) <= cap
    else:  # the watcher: killed soon after the work dir passed the cap (/tmp is swept after)
        assert "over the disk cap" in res.stderr


@pytest.mark.parametrize("namespaces", [True, False])
def test_disk_cap_counts_files(namespaces):
    sandbox = Sandbox(SandboxLimits(disk_files=200), timeout=5.0, max_workers=1, guard=False,
                      namespaces=namespaces)
    res = sandbox.run("import os, time\nfor i in range(5000):\n    open('f%d' % i, 'w').close()\n"
                      "time.sleep(0.5)\n")
    assert res.status == "failed", res


def test_network_connect_and_listen_are_isolated(isolated):
    probe = isolated.run("print(1)")
    _require(probe, "network")
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen()
    host.settimeout(0)
    host_port = host.getsockname()[1]
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    listen_port = spare.getsockname()[1]
    spare.close()
    program = f"""
import socket, time
for target in (("127.0.0.1", {host_port}), ("10.0.0.1", 80), ("1.1.1.1", 53)):
    try:
        socket.create_connection(target, timeout=1)
        print("connected", target)
    except OSError as exc:
        print("connect failed", type(exc).__name__)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", {listen_port}))
srv.listen()
try:
    socket.create_connection(("127.0.0.1", {listen_port}), timeout=1)
    print("self-connect worked")
except OSError as exc:
    print("self-connect failed", type(exc).__name__)
time.sleep(1.5)
"""
    reached: list[str] = []

    def knock():  # while the program listens, try to reach it from the host
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", listen_port), timeout=0.2).close()
                reached.append("host reached the program's listener")
            except OSError:
                pass
            time.sleep(0.05)

    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        res = isolated.run(program)
    finally:
        knocker.join()
    try:
        host.accept()
        reached.append("program reached the host's listener")
    except BlockingIOError:
        pass
    finally:
        host.close()
    assert res.passed, res
    assert "connected" not in res.stdout and "self-connect worked" not in res.stdout, res.stdout
    assert res.stdout.count("connect failed") == 4
    assert reached == []


def test_host_tmp_is_not_readable(isolated):
    probe = Path("/tmp") / f"balora-secret-{uuid.uuid4().hex}"
    probe.write_text("other job's secret")
    probe.chmod(0o644)  # world-readable: the uid alone would not stop this
    try:
        res = isolated.run(f"import os\nprint({probe.name!r} in os.listdir('/tmp'))\n"
                           f"print(open({str(probe)!r}).read())\n")
        _require(res, "mount")
        assert res.status == "failed" and "FileNotFoundError" in res.stderr, res
        assert res.stdout.strip() == "False"
        assert "secret" not in res.stdout
        assert probe.read_text() == "other job's secret"
    finally:
        probe.unlink()


@pytest.mark.parametrize("program", [
    "import posix\nposix.open({path!r}, posix.O_WRONLY | posix.O_CREAT, 0o644)\n",
    "import os\nos.open({path!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n",
    "import io\nio.FileIO({path!r}, 'w')\n",
    "import _io\n_io.open({path!r}, 'w')\n",
])
def test_guard_covers_posix_open_and_fileio(program):
    guarded = Sandbox(timeout=5.0, max_workers=1, guard=True, namespaces=False)  # guard alone
    path = f"/tmp/balora-bypass-{uuid.uuid4().hex}"
    res = guarded.run(program.format(path=path))
    assert res.status == "failed" and "PermissionError" in res.stderr, res
    assert not os.path.exists(path)


def test_isolation_is_reported(isolated, fallback):
    res = isolated.run("print(1)")
    assert set(res.isolation) == {"user", "ipc", "network", "mount", "guard"}
    assert res.isolation["user"] == isolated.switch_user and not res.isolation["guard"]
    off = fallback.run("print(1)").isolation
    assert not (off["ipc"] or off["network"] or off["mount"])
