"""Local processes started by `lambdalake up`: spawn, track by pid file, probe, stop.

Each process runs in its own session (process group), so stopping it also stops the
children it forked (Airflow's workers, Ray's raylet and workers). A pid file records the
pid and the kernel's start time of the process, so a recycled pid is never mistaken for
ours.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lakehouse.errors import ServiceError

# Popen objects of the processes this process started, so that reaping them goes through
# Popen (which then knows its child has exited) rather than behind its back.
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime); the command name in field 2 may contain spaces, so split after ')'
    return stat.rsplit(")", 1)[1].split()[19]


def group_members(pgid: int, *, zombies: bool = False) -> list[int]:
    """The live processes of group `pgid` (with `zombies`, also those that exited and that
    their parent has not collected yet: they hold no port or memory, and waiting for them
    could wait on a parent that is busy waiting for us)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid and (zombies or not _is_zombie(int(entry.name))):
                members.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return members


@dataclass
class ManagedProcess:
    """One long-running command whose pid lives in `<run_dir>/<name>.pid`."""

    name: str
    argv: Sequence[str]
    run_dir: Path
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None

    @property
    def pid_path(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    def pid(self) -> int | None:
        """The pid of our live process, or None (a stale pid file is removed)."""
        try:
            recorded = json.loads(self.pid_path.read_text())
        except (OSError, ValueError):
            return None
        pid = int(recorded["pid"])
        if process_start_time(pid) != recorded["start_time"] or _is_zombie(pid):
            self.pid_path.unlink(missing_ok=True)
            return None
        return pid

    def start(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: "
                      f"{' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen(
                    list(self.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.env},
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ServiceError(f"{self.name}: cannot run {self.argv[0]!r}: {exc}") from None
        _SPAWNED[process.pid] = process
        self.pid_path.write_text(
            json.dumps({"pid": process.pid, "start_time": process_start_time(process.pid),
                        "argv": list(self.argv)})
        )
        return process.pid

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM the process group, SIGKILL what is left after `timeout`. True if it ran."""
        pid = self.pid()
        if pid is None:
            return False
        stop_group(pid, timeout)
        self.pid_path.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def is_running(pid: int | None, start_time: str | None) -> bool:
    """True if `pid` runs and is the process that started at `start_time` (not a reuse)."""
    return (pid is not None and start_time is not None
            and process_start_time(pid) == start_time and not _is_zombie(pid))


def stop_group(pgid: int, timeout: float = 20.0) -> None:
    """SIGTERM every process of group `pgid`, SIGKILL those left after `timeout`.

    The group leader may already be gone: its group lives on while any member does (Linux
    does not hand out a pid still in use as a group id), so the members are ours."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_members(pgid):
        _reap(pgid)
        time.sleep(0.2)
    if group_members(pgid):
        _signal_group(pgid, signal.SIGKILL)
        for _ in range(50):
            _reap(pgid)
            if not group_members(pgid):
                break
            time.sleep(0.1)
    # a moment for their parent (init, once the command that started them has exited) to
    # collect them, so that they are gone from the process table when we return; an init
    # that reaps on a timer, on a loaded machine, can take seconds
    for _ in range(100):
        _reap(pgid)
        if not group_members(pgid, zombies=True):
            break
        time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect our own child's exit status so it does not linger as a zombie."""
    spawned = _SPAWNED.get(pid)
    if spawned is not None:
        if spawned.poll() is not None:
            del _SPAWNED[pid]
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_holder(port: int) -> str:
    """A short description of who listens on a local TCP port, for error messages."""
    inode_by_port: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inode_by_port[inode] = local
    if not inode_by_port:
        return "an unknown process"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inode_by_port:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                    return f"pid {proc.name} ({cmd.strip()})"
        except OSError:
            continue
    return "another process"


def http_ok(url: str, timeout: float = 2.0, *, any_status: bool = False) -> bool:
    """True if GET url answers with a 2xx status (with `any_status`, with any HTTP answer)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return 200 <= status < 300
    except urllib.error.HTTPError as answer:
        answer.close()
        return any_status
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return bool(check())
