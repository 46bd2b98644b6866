"""The sandbox of every child process that opens an untrusted file: upload inspection (`worker.inspect`),
training and export (`worker.run`).

A TorchScript teacher runs code; a checkpoint or an image decoder can misbehave. So the parent builds a
`Policy` (JSON: what the child may read, execute and write, its limits, its uid) and the child confines
itself with `enter(policy)` first thing, before it opens any untrusted file:

- rlimits: address space (RLIMIT_AS), file size (RLIMIT_FSIZE), CPU seconds (RLIMIT_CPU, inspection), no core
  dumps, and processes plus threads (RLIMIT_NPROC, counted per uid: the child gets `max_processes` more than
  its uid runs when it starts).
- uid: a child of a root worker switches to a separate unprivileged uid/gid (65534 by default) when that uid
  can reach the Python installation, the inputs and the job folder; the parent hands it the folder (chown)
  and the inputs (group read). Where it cannot, it stays root without any capability, and because the kernel
  never applies RLIMIT_NPROC to root, seccomp then refuses new processes (threads still work).
- Landlock (worker.landlock): read the runtime (Python installation, site-packages, kdistill's own code,
  /usr and the library folders, /proc, /sys, the few /etc files the C library reads), read the inputs,
  read-write the job's folder only (TMPDIR and HOME point into it), a handful of device nodes (the GPU's
  when a GPU may be used). No other file can be opened; TCP bind/connect refused (ABI 4+); abstract UNIX
  sockets and signals scoped to the sandbox (ABI 6+).
- seccomp (worker.seccomp): socket() of any family but AF_UNIX fails with EACCES; io_uring and metadata
  changes (chmod, chown, xattrs) fail with EPERM.

The child also asks to be killed when its parent dies (PR_SET_PDEATHSIG, set again after the uid switch,
which clears it) and gets no credentials in its environment (`child_env`). `probe()` says which of these
work on this host; TorchScript is refused (`torchscript_unsandboxed`) where Landlock is missing, unless
KDISTILL_ALLOW_UNCONFINED_TORCHSCRIPT says otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import logging
import os
import resource
import signal
import site
import stat
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Settings carry the database URL and object-store secrets; a checkpoint that runs code must not see them.
SECRET_PREFIXES = ("KDISTILL_", "AWS_")
SECRET_NAMES = ("DATABASE_URL",)
UNSANDBOXED_CODE = "torchscript_unsandboxed"
VIOLATION_CODE = "sandbox_violation"

# What every child may read and execute, besides the Python installation: the system's programs and
# libraries, and /proc and /sys (torch and onnxruntime read CPU and memory facts there; other processes'
# private files stay closed: Landlock denies ptrace-like access outside the sandbox).
SYSTEM_EXEC = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
SYSTEM_READ = ("/proc", "/sys")
# Only these from /etc: the rest may hold secrets (shadow, TLS keys, other services' configuration).
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/timezone",
             "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/hosts",
             "/etc/resolv.conf", "/etc/gai.conf", "/etc/mime.types", "/etc/os-release", "/etc/alternatives")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset",
               "/dev/nvidia-caps", "/dev/nvidia[0-9]*")

log = logging.getLogger("kdistill.sandbox")


class SandboxError(Exception):
    code = "sandbox_failed"


# -- credentials and parent death (every child) -------------------------------------------------------------
def child_env() -> dict[str, str]:
    """This process's environment without credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SECRET_PREFIXES) and k not in SECRET_NAMES}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_undumpable() -> None:
    """Keep same-user children (an uploaded TorchScript, say) from reading this process's environment and
    memory through /proc (PR_SET_DUMPABLE 0; Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(4, 0)  # PR_SET_DUMPABLE


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent dies, however it dies (Linux only). Children call it
    themselves (`enter`, `python -m worker.with_parent`), never through a preexec_fn of a threaded parent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# -- the policy ---------------------------------------------------------------------------------------------
@dataclass
class Policy:
    """What one child may do. Built by the parent, passed as JSON (`--sandbox`), applied by `enter`."""

    exec: list[str] = field(default_factory=list)  # read and execute (the runtime)
    read: list[str] = field(default_factory=list)  # read only (inputs, /proc, a few /etc files)
    write: list[str] = field(default_factory=list)  # read-write folders (the job's)
    devices: list[str] = field(default_factory=list)  # device nodes: read, write, ioctl
    tmpdir: str | None = None
    uid: int | None = None  # switch to this uid/gid (a root parent); None: keep the parent's
    gid: int | None = None
    uid_note: str = ""  # why there is no separate uid
    memory_bytes: int | None = None  # RLIMIT_AS
    max_processes: int | None = None  # RLIMIT_NPROC on top of what the uid runs already
    max_file_bytes: int | None = None  # RLIMIT_FSIZE
    cpu_seconds: int | None = None  # RLIMIT_CPU
    parent_pid: int | None = None
    unconfined_torchscript: bool = False  # run TorchScript even without Landlock

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Config:
    """The deployment's sandbox settings (see app.settings, "sandbox_*")."""

    uid: int = 65534
    gid: int = 65534
    inspect_memory: int = 8 << 30
    inspect_cpu_seconds: int = 0  # 0: the inspection timeout times the CPU count
    job_memory: int = 64 << 30
    job_memory_gpu: int = 0
    max_processes: int = 512
    max_file_bytes: int = 64 << 30
    allow_unconfined_torchscript: bool = False
    protect: list[str] = field(default_factory=list)  # never readable, nor any folder holding them

    @classmethod
    def from_settings(cls, settings: Any) -> Config:
        return cls(uid=settings.sandbox_uid, gid=settings.sandbox_gid,
                   inspect_memory=settings.sandbox_inspect_max_memory,
                   inspect_cpu_seconds=settings.sandbox_inspect_cpu_seconds,
                   job_memory=settings.sandbox_job_max_memory, job_memory_gpu=settings.sandbox_job_max_memory_gpu,
                   max_processes=settings.sandbox_max_processes, max_file_bytes=settings.sandbox_max_file_bytes,
                   allow_unconfined_torchscript=settings.allow_unconfined_torchscript,
                   protect=[str(Path(settings.data_dir).resolve())])


def runtime_paths(protect: list[str] | None = None) -> list[str]:
    """What the child's interpreter needs to import its modules: the Python installation, site-packages,
    PYTHONPATH and kdistill's own packages (an editable install keeps them outside site-packages). The
    working directory is left out (it may hold a .env file), and so is any folder that holds a protected
    one (the data folder)."""
    candidates = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *site.getsitepackages(),
                  *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p],
                  str(Path(__file__).resolve().parent)]
    guarded = [Path(p).resolve() for p in [*(protect or []), os.getcwd()]]
    out: list[str] = []
    for c in candidates:
        p = Path(c).resolve()
        if p.exists() and str(p) not in out and not any(g == p or g.is_relative_to(p) for g in guarded):
            out.append(str(p))
    return out


def gpu_devices() -> list[str]:
    return sorted({p for pattern in GPU_DEVICES for p in glob.glob(pattern)})


def build_policy(config: Config, *, work_dir: Path, inputs: list[Path], memory_bytes: int | None,
                 cpu_seconds: int | None, gpu: bool = False) -> Policy:
    """The policy of one child that reads `inputs` and writes `work_dir` (made here, with tmp/ inside), and
    the files prepared for it: with a separate uid, `work_dir` is handed to it and the inputs made readable."""
    work_dir = work_dir.resolve()
    tmp = work_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    policy = Policy(
        exec=[*SYSTEM_EXEC, *runtime_paths(config.protect)],
        read=[*SYSTEM_READ, *ETC_FILES, *[str(Path(p).resolve()) for p in inputs]],
        write=[str(work_dir)], devices=[*DEVICES, *(gpu_devices() if gpu else [])], tmpdir=str(tmp),
        memory_bytes=memory_bytes or None, max_processes=config.max_processes or None,
        max_file_bytes=config.max_file_bytes or None, cpu_seconds=cpu_seconds or None, parent_pid=os.getpid(),
        unconfined_torchscript=config.allow_unconfined_torchscript)
    _choose_uid(policy, config, [Path(p).resolve() for p in inputs])
    return policy


def inspect_policy(config: Config, work_dir: Path, inputs: list[Path], timeout: float) -> Policy:
    cpu = config.inspect_cpu_seconds or int(timeout * (os.cpu_count() or 1)) + 1
    return build_policy(config, work_dir=work_dir, inputs=inputs, memory_bytes=config.inspect_memory,
                        cpu_seconds=cpu)


def job_policy(config: Config, job_dir: Path, inputs: list[Path], device: str = "auto") -> Policy:
    """A training job's policy. CUDA reserves address space by the terabyte, so a job that may use a GPU
    gets `job_memory_gpu` (default: no RLIMIT_AS) instead of `job_memory`."""
    gpu = device != "cpu" and bool(gpu_devices()) and os.environ.get("CUDA_VISIBLE_DEVICES", "x") not in ("", "-1")
    return build_policy(config, work_dir=job_dir, inputs=inputs,
                        memory_bytes=config.job_memory_gpu if gpu else config.job_memory, cpu_seconds=None, gpu=gpu)


# -- the separate uid (parent side) -------------------------------------------------------------------------
def _allows(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    """Whether `uid`/`gid` (no supplementary groups) gets `bits` (a mask of r=4, w=2, x=1) on this inode."""
    mode = stat.S_IMODE(st.st_mode)
    have = (mode >> 6) & 7 if st.st_uid == uid else (mode >> 3) & 7 if st.st_gid == gid else mode & 7
    return have & bits == bits


def unreachable(path: Path, uid: int, gid: int, *, self_bits: int = 0) -> str | None:
    """The first folder on the way to `path` that `uid` cannot search (and `path` itself lacking
    `self_bits`), as a sentence; None when it can get there."""
    for p in [*reversed(path.parents), path]:
        try:
            st = p.stat()
        except OSError as e:
            return f"{p}: {e.strerror}"
        bits = self_bits if p == path else 1
        if bits and not _allows(st, uid, gid, bits):
            return f"{p} ({stat.filemode(st.st_mode)}) is closed to uid {uid}"
    return None


def separate_uid_problem(config: Config, runtime: list[str] | None = None) -> str | None:
    """Why this process cannot run children under the separate uid, or None when it can."""
    if os.geteuid() != 0:
        return f"the worker runs as uid {os.geteuid()}, not root: children keep it"
    if not config.uid:
        return "switched off (KDISTILL_SANDBOX_UID=0)"
    for p in runtime if runtime is not None else runtime_paths(config.protect):
        if why := unreachable(Path(p), config.uid, config.gid, self_bits=5):
            return f"the Python installation is not reachable: {why}"
    return None


def _choose_uid(policy: Policy, config: Config, inputs: list[Path]) -> None:
    problem = separate_uid_problem(config, [p for p in policy.exec if p not in SYSTEM_EXEC])
    uid, gid = config.uid, config.gid
    # An input's own folder may be one of ours that only root can enter (an upload's); it is opened to
    # the sandbox's group, with the file. Everything above must be reachable already.
    fix_dirs = {p.parent for p in inputs}
    if problem is None:
        for p in inputs:
            if why := unreachable(p.parent.parent, uid, gid, self_bits=1):
                problem = f"an input is not reachable: {why}"
                break
    if problem is None:
        for w in policy.write:
            parent = Path(w).parent
            if parent not in fix_dirs and (why := unreachable(parent, uid, gid, self_bits=1)):
                problem = f"the job folder is not reachable: {why}"
                break
    if problem is not None:
        policy.uid_note = problem
        return
    try:
        for d in sorted(fix_dirs):
            _grant(d, gid, 0o010, 1)
        for p in inputs:
            _grant(p, gid, 0o040, 4)
        for w in policy.write:
            _hand_over(Path(w), uid, gid)
    except OSError as e:  # a file system that refuses chown (NFS with root squashing, say)
        policy.uid_note = f"could not hand the files to uid {uid}: {e}"
        return
    policy.uid, policy.gid = uid, gid


def _grant(path: Path, gid: int, group_bits: int, need: int) -> None:
    """Give the sandbox's group `group_bits` on `path` when it lacks `need`: the owner stays, the group
    becomes the sandbox's (a file another group could read loses that group)."""
    st = path.stat()
    if _allows(st, -1, gid, need):
        return
    os.chown(path, -1, gid)
    os.chmod(path, stat.S_IMODE(st.st_mode) | group_bits)


def _hand_over(folder: Path, uid: int, gid: int) -> None:
    """chown -R, without following links, and never a file with other hard links (it would be someone
    else's file, linked in by an earlier child)."""
    os.lchown(folder, uid, gid)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
                os.lchown(path, uid, gid)


# -- the child side -----------------------------------------------------------------------------------------
@dataclass
class Confinement:
    """What `enter` achieved."""

    landlock_abi: int = 0
    seccomp: str | None = None  # the architecture whose filter is installed
    uid: int = -1
    separate_uid: bool = False
    processes: str = "unbounded"  # "rlimit N", "no new processes (seccomp)" or "unbounded"
    limits: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unconfined_torchscript: bool = False  # the deployment accepts TorchScript without Landlock

    @property
    def contains_code(self) -> bool:
        """Whether code in an upload is kept to its files: Landlock is the filesystem wall."""
        return self.landlock_abi >= 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "contains_code": self.contains_code}

    def summary(self) -> str:
        return (f"landlock ABI {self.landlock_abi or 'missing'}, seccomp {self.seccomp or 'missing'}, "
                f"uid {self.uid}{' (separate)' if self.separate_uid else ''}, processes: {self.processes}, "
                f"memory {_size(self.limits.get('memory_bytes'))}")


def enter(policy: Policy) -> Confinement:
    """Confine this process (call it while it has one thread, before it opens an untrusted file)."""
    from worker import landlock, seccomp

    if _threads() != 1:
        raise SandboxError("the sandbox must be entered before any thread starts")
    done = Confinement(unconfined_torchscript=policy.unconfined_torchscript)
    os.umask(0o077)
    if policy.tmpdir:
        for name in ("TMPDIR", "TMP", "TEMP"):
            os.environ[name] = policy.tmpdir
        os.environ["HOME"] = str(Path(policy.tmpdir).parent)
        tempfile.tempdir = None
    if policy.memory_bytes:
        # glibc reserves 64 MiB of address space per malloc arena, up to 8 per core: keep it to a few
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).mallopt(-8, 4)  # M_ARENA_MAX
    switch = policy.uid is not None and os.geteuid() == 0
    target_uid = policy.uid if switch else os.getuid()
    limits = {"memory_bytes": (resource.RLIMIT_AS, policy.memory_bytes),
              "max_file_bytes": (resource.RLIMIT_FSIZE, policy.max_file_bytes),
              "cpu_seconds": (resource.RLIMIT_CPU, policy.cpu_seconds), "core": (resource.RLIMIT_CORE, 0)}
    if policy.max_processes and target_uid != 0:
        nproc = _tasks_of(target_uid) + policy.max_processes
        limits["max_processes"] = (resource.RLIMIT_NPROC, nproc)
        done.processes = f"rlimit {nproc} tasks for uid {target_uid} ({policy.max_processes} more than at start)"
    for name, (which, value) in limits.items():
        if value is not None:
            _lower(which, value, grace=5 if which == resource.RLIMIT_CPU else 0)
        done.limits[name] = value
    if switch:
        assert policy.uid is not None and policy.gid is not None
        os.setgroups([])
        os.setresgid(policy.gid, policy.gid, policy.gid)
        os.setresuid(policy.uid, policy.uid, policy.uid)
        done.separate_uid = True
    elif os.geteuid() == 0:
        _drop_capabilities()
        done.notes.append("stays root without capabilities" + (f": {policy.uid_note}" if policy.uid_note else ""))
    done.uid = os.getuid()
    make_undumpable()
    if policy.parent_pid is not None:
        die_with_parent()  # after the uid switch, which clears it
        if os.getppid() != policy.parent_pid:
            os._exit(137)  # the parent died before we could ask to die with it

    rules = [(p, landlock.EXEC) for p in policy.exec] + [(p, landlock.READ) for p in policy.read]
    rules += [(p, landlock.WRITE) for p in policy.write] + [(p, landlock.DEVICE) for p in policy.devices]
    if landlock.abi_version() >= 1:
        done.landlock_abi = landlock.restrict(rules)
    else:
        done.notes.append("Landlock is missing: files are not confined")
    deny_processes = done.uid == 0 and bool(policy.max_processes)
    if seccomp.available():
        done.seccomp = seccomp.install(deny_truncate=done.landlock_abi < 3, deny_processes=deny_processes)
        if deny_processes:
            done.processes = "no new processes (seccomp; RLIMIT_NPROC does not apply to root)"
    else:
        done.notes.append("seccomp is missing: the network is open")
    return done


def enter_from_argv(value: str | None) -> Confinement | None:
    """`--sandbox JSON` of worker.run and worker.inspect: enter it when given."""
    return enter(Policy.from_json(value)) if value else None


def torchscript_refusal(confinement: Confinement | None) -> str | None:
    """The message for `torchscript_unsandboxed` when a TorchScript file must not be opened here."""
    if confinement is None or confinement.contains_code or confinement.unconfined_torchscript:
        return None  # no sandbox asked for (a local `kdistill run`), one that holds, or a deployment's choice
    return ("TorchScript runs code and this host cannot confine it (Landlock is missing: "
            f"{confinement.summary()}); upload ONNX, safetensors or a state dict, or set "
            "KDISTILL_ALLOW_UNCONFINED_TORCHSCRIPT=true to accept the risk")


def as_violation(confinement: Confinement | None, error: dict[str, Any]) -> dict[str, Any]:
    """An error line of a sandboxed child, with code `sandbox_violation` when the failure is the sandbox
    refusing something (EACCES/EPERM: a file outside the policy, a socket, a process)."""
    message = str(error.get("message", ""))
    if confinement is None or not any(m in message for m in ("Permission denied", "Operation not permitted")):
        return error
    return {**{k: v for k, v in error.items() if k != "field"}, "code": VIOLATION_CODE,
            "message": "the upload tried something its sandbox forbids (a file outside its inputs and its folder, "
                       f"a network connection or a new process) and was stopped: {message}"}


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _tasks_of(uid: int) -> int:
    """How many tasks (processes and threads) `uid` runs: what RLIMIT_NPROC counts."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:  # the real uid (what the kernel counts by), not the owner of /proc/PID (root when undumpable)
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    n += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                pass
    return n


def _lower(which: int, value: int, grace: int = 0) -> None:
    _soft, hard = resource.getrlimit(which)
    new_hard = value + grace if hard == resource.RLIM_INFINITY else min(hard, value + grace)
    resource.setrlimit(which, (min(value, new_hard), new_hard))


CAP_HEADER_V3 = 0x20080522


def _drop_capabilities() -> None:
    """Root without capabilities: no override of file permissions, no raw sockets, no module loading; the
    bounding set is emptied too, so no program it runs gets them back."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(CAP_HEADER_V3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"capset: {os.strerror(e)}")


def _size(n: int | None) -> str:
    return "unlimited" if not n else f"{n / (1 << 30):.0f} GiB"


# -- what this host offers ----------------------------------------------------------------------------------
def probe(config: Config | None = None) -> dict[str, Any]:
    """Which protections work here, for logs and `kdistill doctor`."""
    from worker import landlock, seccomp

    config = config or Config()
    abi = landlock.abi_version()
    uid_problem = separate_uid_problem(config)
    root = os.geteuid() == 0
    a = seccomp.arch()
    return {
        "landlock_abi": abi,
        "landlock": abi >= 1,
        "seccomp": seccomp.available(),
        "seccomp_arch": a.name if a else None,
        "root": root,
        "separate_uid": uid_problem is None,
        "uid": config.uid if uid_problem is None else os.geteuid(),
        "uid_note": uid_problem or f"children run as uid {config.uid}, gid {config.gid}",
        "processes": ("rlimit" if not root or uid_problem is None else
                      "no new processes (seccomp)" if seccomp.available() else "unbounded"),
        "rlimits": {"inspect_memory": config.inspect_memory or None, "job_memory": config.job_memory or None,
                    "job_memory_gpu": config.job_memory_gpu or None, "max_processes": config.max_processes,
                    "max_file_bytes": config.max_file_bytes or None},
        "torchscript_contained": abi >= 1,
    }


def describe(p: dict[str, Any]) -> str:
    return (f"sandbox: landlock {'ABI ' + str(p['landlock_abi']) if p['landlock'] else 'MISSING'}, "
            f"seccomp {p['seccomp_arch'] if p['seccomp'] else 'MISSING'}, "
            f"uid {p['uid']}{' (separate)' if p['separate_uid'] else ''}, processes {p['processes']}, "
            f"memory inspect {_size(p['rlimits']['inspect_memory'])} / job {_size(p['rlimits']['job_memory'])} "
            f"(GPU {_size(p['rlimits']['job_memory_gpu'])})")


_logged = False


def log_protections_once(settings: Any) -> None:
    """`log_protections` the first time a process starts a sandboxed child (the supervisor, the API)."""
    global _logged
    if not _logged:
        _logged = True
        try:
            log_protections(settings)
        except Exception:  # a log line must never stop an upload or a job
            log.exception("sandbox: could not probe this host")


def log_protections(settings: Any, logger: logging.Logger | None = None) -> dict[str, Any]:
    """Log what the sandbox can do on this host (for start-up: app.main and the Celery worker can call it)."""
    logger = logger or log
    p = probe(Config.from_settings(settings))
    logger.info(describe(p))
    if not p["separate_uid"] and p["root"]:
        logger.warning("sandbox: children stay root (without capabilities): %s", p["uid_note"])
    if not p["landlock"]:
        if settings.allow_torchscript and settings.allow_unconfined_torchscript:
            logger.warning("sandbox: Landlock is missing and KDISTILL_ALLOW_UNCONFINED_TORCHSCRIPT is set: "
                           "TorchScript teachers run unconfined and can read and write this worker's files")
        elif settings.allow_torchscript:
            logger.warning("sandbox: Landlock is missing: TorchScript uploads and jobs are refused (%s)",
                           UNSANDBOXED_CODE)
    if not p["seccomp"]:
        logger.warning("sandbox: seccomp is missing: children can open network connections")
    return p
