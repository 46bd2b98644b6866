"""Hostile Python in a child confined by `sandbox.enter` with a real inspection policy: what TorchScript
cannot express (sockets, huge allocations, fork loops) and what it can (files) are all stopped."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from sandbox_support import run_confined

from worker import landlock
from worker.sandbox import (
    DEVICES,
    ETC_FILES,
    SYSTEM_EXEC,
    SYSTEM_READ,
    Config,
    Policy,
    _choose_uid,
    inspect_policy,
    unreachable,
)

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or landlock.abi_version() < 1,
                                reason="needs Linux with Landlock")


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """A data folder laid out as the API's: a database, an upload in its own folder; a canary outside."""
    data = tmp_path / "data"
    upload = data / "tmp" / "upload-1"
    upload.mkdir(parents=True)
    (data / "kdistill.db").write_bytes(b"SQLite format 3\0" + os.urandom(4096))
    (upload / "teacher.pt").write_bytes(os.urandom(256))
    (tmp_path / "canary.bin").write_bytes(os.urandom(256))
    return {"data": data, "db": data / "kdistill.db", "upload": upload / "teacher.pt",
            "canary": tmp_path / "canary.bin"}


def policy_for(site: dict[str, Path], **config: object) -> Policy:
    work = Path(tempfile.mkdtemp(prefix="inspect-", dir=site["upload"].parent))
    return inspect_policy(Config(protect=[str(site["data"])], **config), work, [site["upload"]], timeout=60)


def test_files_outside_the_policy_cannot_be_read_or_written(site):
    policy = policy_for(site)
    code = f"""
out = {{}}
def attempt(name, f):
    try:
        f()
        out[name] = "ok"
    except OSError as e:
        out[name] = type(e).__name__
attempt("read_upload", lambda: open({str(site['upload'])!r}, "rb").read())
attempt("read_db", lambda: open({str(site['db'])!r}, "rb").read())
attempt("write_canary", lambda: open({str(site['canary'])!r}, "r+b").write(b"A"))
attempt("create_beside_canary", lambda: open({str(site['canary'])!r} + ".new", "wb"))
attempt("list_data", lambda: os.listdir({str(site['data'])!r}))
attempt("chmod_canary", lambda: os.chmod({str(site['canary'])!r}, 0o777))
attempt("write_upload", lambda: open({str(site['upload'])!r}, "r+b").write(b"A"))
attempt("read_etc_shadow", lambda: open("/etc/shadow").read())
attempt("write_work", lambda: open(os.path.join(os.environ["TMPDIR"], "x"), "wb").write(b"ok"))
attempt("symlink_in_work", lambda: os.symlink({str(site['db'])!r}, os.path.join(os.environ["TMPDIR"], "db")))
import tempfile
out["tmpdir"] = tempfile.gettempdir()
print(json.dumps(out))
"""
    before = {k: site[k].read_bytes() for k in ("db", "canary", "upload")}
    out = run_confined(policy, code)
    assert out.pop("read_upload") == "ok" and out.pop("write_work") == "ok"
    assert out.pop("tmpdir") == policy.tmpdir
    assert set(out.values()) == {"PermissionError"}, out
    assert {k: site[k].read_bytes() for k in ("db", "canary", "upload")} == before
    assert not Path(str(site["canary"]) + ".new").exists()


def test_no_network_but_unix_sockets():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[object] = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    code = f"""
import errno, socket
out = {{}}
S = socket
for name, family, kind in (("inet", S.AF_INET, S.SOCK_STREAM), ("inet_udp", S.AF_INET, S.SOCK_DGRAM),
                           ("inet6", S.AF_INET6, S.SOCK_STREAM), ("netlink", S.AF_NETLINK, S.SOCK_RAW),
                           ("unix", S.AF_UNIX, S.SOCK_STREAM)):
    try:
        socket.socket(family, kind).close()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5)
    out["connect"] = "ok"
except OSError as e:
    out["connect"] = errno.errorcode.get(e.errno, str(e))
a, b = socket.socketpair()
a.sendall(b"x")
out["socketpair"] = b.recv(1).decode()
print(json.dumps(out))
"""
    with tempfile.TemporaryDirectory() as work:
        policy = inspect_policy(Config(), Path(work), [], timeout=60)
        out = run_confined(policy, code)
    server.close()
    assert out == {"inet": "EACCES", "inet_udp": "EACCES", "inet6": "EACCES", "netlink": "EACCES", "unix": "ok",
                   "connect": "EACCES", "socketpair": "x"}
    assert not accepted


def test_a_20_gib_allocation_fails_with_memory_error(site):
    policy = policy_for(site)  # the inspection default: 8 GiB of address space
    assert policy.memory_bytes == 8 << 30
    code = """
small = bytearray(256 << 20)  # real work still gets memory
try:
    big = bytearray(20 << 30)
    out = {"big": "allocated"}
except MemoryError:
    out = {"big": "MemoryError"}
print(json.dumps({**out, "small": len(small)}))
"""
    assert run_confined(policy, code) == {"big": "MemoryError", "small": 256 << 20}


FORK_LOOP = """
import errno, signal, time
pids, stopped = [], None
while len(pids) < 10000:
    try:
        pid = os.fork()
    except OSError as e:
        stopped = errno.errorcode[e.errno]
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(json.dumps({"forks": len(pids), "stopped": stopped, "uid": os.getuid(), "processes": confinement.processes}))
"""


def test_a_fork_loop_stops_without_harming_the_parent(site):
    policy = policy_for(site, max_processes=8)
    out = run_confined(policy, FORK_LOOP)
    if out["uid"] == 0:  # root is never bounded by RLIMIT_NPROC: the sandbox refuses new processes instead
        assert out == {"forks": 0, "stopped": "EPERM", "uid": 0, "processes": out["processes"]}
        assert out["processes"].startswith("no new processes")
    else:
        assert out["stopped"] == "EAGAIN" and out["forks"] <= 8, out
    assert subprocess.run(["true"], check=False).returncode == 0  # this process still starts processes


SYSTEM_PYTHON = "/usr/bin/python3"
WORKER_DIR = Path(__file__).resolve().parents[2] / "worker"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to a separate uid needs a root parent")
def test_a_separate_uid_gets_its_files_and_is_bounded_by_rlimit_nproc():
    """The path of a root worker whose separate uid can reach everything: the parent hands over the work
    folder and opens the upload (in its private 0700 folder, a 0600 file) to the sandbox's group; the child
    switches uid, and RLIMIT_NPROC stops its fork loop. Here with the system's Python (the virtualenv's may
    sit under /root) and a data folder under /tmp."""
    uid = gid = 65534
    if not os.access(SYSTEM_PYTHON, os.X_OK) or unreachable(Path(SYSTEM_PYTHON).resolve(), uid, gid, self_bits=5):
        pytest.skip("no system Python that uid 65534 can run")
    if why := unreachable(WORKER_DIR, uid, gid, self_bits=5):
        pytest.skip(f"uid 65534 cannot read this checkout: {why}")
    data = Path(tempfile.mkdtemp(prefix="kdistill-sandbox-test-", dir="/tmp"))
    try:
        os.chmod(data, 0o755)  # a data folder as `mkdir` makes it
        upload_dir = data / "tmp" / "upload-1"
        upload_dir.mkdir(parents=True)
        os.chmod(upload_dir, 0o700)
        upload = upload_dir / "teacher.bin"
        upload.write_bytes(b"weights")
        os.chmod(upload, 0o600)
        (data / "kdistill.db").write_bytes(b"SQLite format 3\0")
        os.chmod(data / "kdistill.db", 0o644)  # readable by anyone: only Landlock keeps it closed
        work = upload_dir / "inspect-1"
        (work / "tmp").mkdir(parents=True)
        policy = Policy(exec=[*SYSTEM_EXEC, str(WORKER_DIR)], read=[*SYSTEM_READ, *ETC_FILES, str(upload)],
                        write=[str(work)], devices=list(DEVICES), tmpdir=str(work / "tmp"), memory_bytes=2 << 30,
                        max_processes=8, parent_pid=os.getpid())
        _choose_uid(policy, Config(uid=uid, gid=gid, protect=[str(data)]), [upload])
        assert (policy.uid, policy.gid, policy.uid_note) == (uid, gid, "")
        assert work.stat().st_uid == uid and upload.stat().st_uid == 0  # the upload stays root's
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(WORKER_DIR.parent)}
        out = run_confined(policy, FORK_LOOP, python=SYSTEM_PYTHON, env=env)
        assert out["uid"] == uid and out["stopped"] == "EAGAIN" and 0 < out["forks"] <= 8, out
        assert out["processes"].startswith("rlimit")
        code = f"""
out = {{"uid": os.getuid(), "groups": os.getgroups()}}
for name, f in (("upload", lambda: open({str(upload)!r}, "rb").read().decode()),
                ("work", lambda: open(os.path.join({str(work)!r}, "out"), "w").write("ok")),
                ("db", lambda: open({str(data / "kdistill.db")!r}, "rb").read().decode())):
    try:
        out[name] = f()
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""
        out = run_confined(policy, code, python=SYSTEM_PYTHON, env=env)
        assert out == {"uid": uid, "groups": [], "upload": "weights", "work": 2, "db": "PermissionError"}
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_entering_after_a_thread_started_is_refused(tmp_path):
    code = """
import json, sys, threading, time
from worker.sandbox import Policy, SandboxError, enter
threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
try:
    enter(Policy.from_json(sys.argv[1]))
    print(json.dumps({"entered": True}))
except SandboxError as e:
    print(json.dumps({"entered": False, "why": str(e)}))
"""
    proc = subprocess.run([sys.executable, "-P", "-c", code, Policy().to_json()], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert '"entered": false' in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("abi", range(1, landlock.abi_version() + 1))
def test_every_landlock_abi_builds_a_ruleset_that_holds(site, abi):
    """The ruleset of each older ABI (fewer rights handled, smaller struct) is accepted and still keeps
    files outside the policy closed; TCP is refused from ABI 4 on by Landlock itself."""
    work = site["upload"].parent / "work"
    work.mkdir()
    code = f"""
import errno, socket, sys
from worker import landlock as L
rules = [(p, L.EXEC) for p in ("/usr", "/lib", "/lib64", sys.prefix, sys.base_prefix)]
rules += [({str(site['upload'])!r}, L.READ), ({str(work)!r}, L.WRITE), ("/proc", L.READ)]
used = L.restrict(rules, abi={abi})
out = {{"abi": used}}
for name, f in (("upload", lambda: open({str(site['upload'])!r}, "rb").read() and "ok"),
                ("work", lambda: open({str(work / 'x')!r}, "wb").write(b"x") and "ok"),
                ("db", lambda: open({str(site['db'])!r}, "rb").read() and "ok"),
                ("canary", lambda: open({str(site['canary'])!r}, "r+b").write(b"A") and "ok"),
                ("tcp", lambda: socket.create_connection(("127.0.0.1", 9), timeout=2) and "ok")):
    try:
        out[name] = f()
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, "?")
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-P", "-c", "import json\n" + code], capture_output=True, text=True,
                          timeout=60, cwd=work)
    out = json.loads(proc.stdout.splitlines()[-1]) if proc.stdout else proc.stderr
    # without Landlock's TCP rule (ABI < 4) nothing listens on port 9: refused by the network, not the sandbox
    assert out == {"abi": abi, "upload": "ok", "work": "ok", "db": "EACCES", "canary": "EACCES",
                   "tcp": "EACCES" if abi >= 4 else "ECONNREFUSED"}, out
