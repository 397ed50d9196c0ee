"""One writer per run folder: `<run>/run.lock`, held for the whole run by the process that starts it.

Two commands writing one run folder mix their checkpoints, adapters and MLflow logging (a second
launch of the same config would "resume" the live run from its newest checkpoint). So the
process that starts a run takes the folder's lock before anything is written (`--fresh`
included), keeps its heartbeat fresh while the run lasts and removes it at the end, failures
included. Who holds it: rank 0 under torchrun and the DeepSpeed launcher (pipeline.launch.worker);
the driver under Ray (`tsd train`), so that Ray Train restarting the worker group of the same job
never meets its own lock. A second command on the folder is refused (RunFolderBusy, a ValueError:
one line, exit 2) naming the holder's host, pid and the age of its heartbeat.

The lock is a small JSON record: host, pid, what holds it, its command, when it started, a
heartbeat (the holder's clock, rewritten every HEARTBEAT_S by a daemon thread) and a token.

Taking it, on a local disk or a shared one (NFS, where every node reads and writes the run
folder): the record is written to a file of this process's own name in the run folder and then
hard-linked to `run.lock`. link(2) fails with EEXIST when the name exists, atomically on the
server, on every NFS version, and the lock appears with its content (never an empty lock that a
reader could misjudge). This is open(2)'s own recipe for NFS lock files; a lost reply (the link
made, the retry told EEXIST) is recognised by the link count of our file. Not O_CREAT|O_EXCL
(atomic on NFS only from v3 on, and the file exists before its content), not fcntl/flock locks
(on NFS they depend on lockd, and `nolock`/`local_lock` mounts keep them per node, so two nodes
would both "hold" the lock; Lustre and GPFS differ again; and they carry no host or pid to name).
O_CREAT|O_EXCL remains the fallback where a file system refuses hard links (some FUSE mounts).
A heartbeat is a new record renamed over `run.lock` (atomic too: a reader sees the old record or
the new one), after checking that the lock is still this process's.

A stale lock is taken over, with a log line: its process has ended (checked only where its pid
means something: the same host, boot and pid namespace; a zombie or a reused pid counts as
ended), its heartbeat is older than STALE_AFTER_S (by the reader's clock: nodes' clocks are
assumed to agree within seconds, as NTP keeps them), or it belongs to an earlier attempt of the
same torchrun job (an elastic restart may give rank 0 to another node). Taking over renames the
stale lock away (one of several takers wins), checks that what it renamed is what it judged
stale, and then takes the lock as above.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.logs import log

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 120.0  # a heartbeat this old is a dead holder's (12 missed beats: NFS hiccups, a stalled node)


class RunFolderBusy(ValueError):
    """Another live process writes this run folder."""


@dataclass(frozen=True)
class Holder:
    """What `run.lock` records."""

    host: str
    pid: int
    what: str  # e.g. "torchrun rank 0", "tsd train (Ray driver)"
    command: str
    started: float
    heartbeat: float
    token: str
    scope: str | None = None  # where `pid` is meaningful: host, boot and pid namespace
    pid_start: int | None = None  # the process's start time (clock ticks since boot): a reused pid differs
    job: str | None = None  # a launcher's job id (torchrun's TORCHELASTIC_RUN_ID) and its attempt
    attempt: int = 0

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)


def _read_proc(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def pid_scope() -> str | None:
    """Where this process's pids mean something: the host, its boot and our pid namespace
    (containers on one host share the boot but not the pids). None where /proc cannot tell."""
    boot = _read_proc("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return f"{socket.gethostname()}/{boot}/{namespace}" if boot and namespace else None


def _process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of `pid`, None if there is no such process."""
    stat = _read_proc(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 on
    return fields[0], int(fields[19])


def _job() -> tuple[str | None, int]:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return (f"torchrun:{run_id}" if run_id else None), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def why_stale(holder: Holder, now: float | None = None) -> str | None:
    """Why `holder`'s lock may be taken over by this process, or None while it is live."""
    if holder.scope is not None and holder.scope == pid_scope():
        state = _process_state(holder.pid)
        if state is None or state[0] in ("Z", "X") or (holder.pid_start is not None and state[1] != holder.pid_start):
            return "its process has ended"
    if holder.age(now) > STALE_AFTER_S:
        return f"its heartbeat is {holder.age(now):.0f}s old (more than {STALE_AFTER_S:.0f}s)"
    job, attempt = _job()
    if job is not None and holder.job == job and attempt > holder.attempt:
        return f"it is attempt {holder.attempt} of this torchrun job (this is attempt {attempt})"
    return None


def read_holder(path: Path) -> Holder | None:
    """The record in lock file `path`, or None when there is none. An unreadable file (written by
    hand, truncated by a crash of a disk) reads as a holder whose heartbeat is the file's mtime."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (ValueError, TypeError, KeyError):
        return Holder(host="?", pid=-1, what="an unreadable lock", command="", started=mtime, heartbeat=mtime,
                      token=f"unreadable-{mtime}")


def busy_message(run_dir: Path, holder: Holder) -> str:
    return (f"{run_dir} is in use by another run: {holder.what}, pid {holder.pid} on host {holder.host}, heartbeat "
            f"{holder.age():.0f}s ago ({run_dir / LOCK_FILE}); wait for it to end or stop it, or train under another "
            f"name (--set name=NEW). The lock is taken over once its process has ended or its heartbeat is over "
            f"{STALE_AFTER_S:.0f}s old")


_held: dict[str, RunLock] = {}  # token -> the locks this process holds


def check_not_busy(run_dir: Path) -> None:
    """Raise RunFolderBusy when a live process other than this one holds `run_dir`'s lock
    (for commands that change a run folder without holding its lock themselves)."""
    holder = read_holder(Path(run_dir) / LOCK_FILE)
    if holder is not None and holder.token not in _held and why_stale(holder) is None:
        raise RunFolderBusy(busy_message(Path(run_dir), holder))


class RunLock:
    """The lock of one run folder, for one process: `acquire`, then `release` (idempotent).
    `with RunLock(run_dir, what):` does both."""

    def __init__(self, run_dir: Path | str, what: str):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / LOCK_FILE
        self.what = what
        self.token = uuid.uuid4().hex
        self.made_folder = False  # the folder did not exist: an empty one is removed again at release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()  # the heartbeat and release never interleave
        self._lost = False

    def _record(self, started: float | None = None) -> Holder:
        state = _process_state(os.getpid())
        job, attempt = _job()
        now = time.time()
        return Holder(host=socket.gethostname(), pid=os.getpid(), what=self.what,
                      command=shlex.join([os.path.basename(sys.executable), *sys.argv])[:300],
                      started=started or now, heartbeat=now, token=self.token, scope=pid_scope(),
                      pid_start=state[1] if state else None, job=job, attempt=attempt)

    def _write_own(self, holder: Holder) -> Path:
        """The record in a file of this process's own name next to the lock."""
        own = self.run_dir / f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with open(own, "w") as f:
            json.dump(asdict(holder), f)
            f.flush()
            os.fsync(f.fileno())  # on the server before it is linked: a reader on another node sees it whole
        return own

    def _link(self, holder: Holder) -> bool:
        """Try to create the lock with `holder`'s record; False if the name exists."""
        own = self._write_own(holder)
        try:
            os.link(own, self.path)
            return True
        except FileExistsError:
            return os.stat(own).st_nlink == 2  # NFS: the link was made, its reply lost and the retry refused
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            return self._create_exclusive(holder)  # a file system without hard links (some FUSE mounts)
        finally:
            os.unlink(own)

    def _create_exclusive(self, holder: Holder) -> bool:
        """The fallback where links are refused: O_CREAT|O_EXCL (the record follows at once; a
        reader meanwhile sees an unreadable lock, which counts as live by its mtime)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(holder), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> RunLock:
        """Take the lock (taking over a stale one, logged) and start the heartbeat; RunFolderBusy
        when a live process holds it."""
        self.made_folder = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        for _ in range(5):  # a few rounds: other takers may race for a stale lock
            if self._link(self._record(self._started)):
                break
            holder = read_holder(self.path)
            if holder is None:
                continue  # released meanwhile
            why = why_stale(holder)
            if why is None:
                self._remove_empty_folder()
                raise RunFolderBusy(busy_message(self.run_dir, holder))
            if self._take_over(holder):
                log(f"{self.path}: took over the lock of {holder.what} on host {holder.host}, pid {holder.pid} "
                    f"(heartbeat {holder.age():.0f}s ago): {why}")
        else:
            holder = read_holder(self.path)
            self._remove_empty_folder()
            raise RunFolderBusy(busy_message(self.run_dir, holder) if holder else f"{self.path}: could not be taken")
        _held[self.token] = self
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name="tsd-run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, stale: Holder) -> bool:
        """Move `stale`'s lock away, if it is still that one; True when the name is free for us."""
        aside = self.run_dir / f"{LOCK_FILE}.stale.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # another taker (or its holder) removed it: try again
        moved = read_holder(aside)
        if moved is not None and moved.token == stale.token and why_stale(moved) is not None:
            aside.unlink(missing_ok=True)
            return True
        try:  # its holder beat in between, or another taker's fresh lock: put it back
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except OSError as e:  # a shared disk's hiccup: the next beat tries again
                log(f"WARNING: {self.path}: heartbeat not written ({type(e).__name__}: {e})")
            if self._lost:
                return

    def beat(self) -> None:
        """Rewrite the heartbeat, if the lock is still this process's."""
        with self._guard:
            if self._stop.is_set() or self._lost:
                return
            current = read_holder(self.path)
            if current is not None and current.token != self.token:
                self._lost = True
                log(f"WARNING: {self.path} was taken over by {current.what} on host {current.host}, pid "
                    f"{current.pid}: this run's heartbeat stalled for over {STALE_AFTER_S:.0f}s and another run "
                    f"now writes this folder too; stop one of them")
                return
            if current is None:  # removed by hand, or --fresh moving the folder aside: take it again if free
                self._link(self._record(self._started))  # if someone else has it now, the next beat says so
                return
            own = self._write_own(self._record(self._started))
            os.replace(own, self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this process's; an empty folder
        this lock made goes too. Safe to call more than once, from any thread."""
        self._stop.set()
        with self._guard:
            _held.pop(self.token, None)
            current = read_holder(self.path)
            if current is not None and current.token == self.token:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            self._remove_empty_folder()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1)

    def _remove_empty_folder(self) -> None:
        if self.made_folder:
            try:
                self.run_dir.rmdir()  # only if empty: nothing else was written
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
