"""Two hosts on one machine for the multi-node tests: network namespaces joined by a veth pair.

Each host is a network namespace with its own address on a private /24 and only its own
loopback: a process in one reaches the other over the veth link, exactly as two machines on a
LAN would, and nothing leaves the namespaces this module made. The filesystem is shared (as a
cluster's shared storage is); a host can be given a private view of one folder (`hidden`) to play
a node that does not mount the shared disk.

Both ends of the link are named `tsdnet0` inside their namespaces, so one GLOO_SOCKET_IFNAME
serves every rank (all namespaces share the machine's hostname, which resolves to an address
that exists in none of them: gloo must be told the interface).

    with TwoHosts() as net:
        net.run("head", ["ray", "start", "--head", f"--node-ip-address={net.address('head')}", ...])

`python tests/netns_cluster.py up` / `down PREFIX` make and remove a pair by hand. Needs root
(`ip netns`); `TwoHosts.available()` says whether this machine allows it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

IFNAME = "tsdnet0"


class TwoHosts:
    """Namespaces `<prefix>-head` and `<prefix>-node` on 10.<a>.<b>.0/24 (.1 and .2)."""

    NAMES = ("head", "node")

    def __init__(self, prefix: str | None = None):
        pid = os.getpid()
        self.prefix = prefix or f"tsd{pid}"
        self.subnet = f"10.{200 + pid % 50}.{(pid // 50) % 250}"
        self._procs: list[subprocess.Popen] = []
        self._hidden: dict[str, list[str]] = {n: [] for n in self.NAMES}

    # -- set-up and tear-down
    @staticmethod
    def available() -> str | None:
        """None when namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "not root"
        probe = f"tsdprobe{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{self.NAMES.index(host) + 1}"

    def up(self) -> TwoHosts:
        a, b = (self.ns(h) for h in self.NAMES)
        ends = (f"{self.prefix}a"[:15], f"{self.prefix}b"[:15])
        steps = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
                 ["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]]]
        for ns, end, host in ((a, ends[0], "head"), (b, ends[1], "node")):
            steps += [["ip", "link", "set", end, "netns", ns],
                      ["ip", "-n", ns, "link", "set", end, "name", IFNAME],
                      ["ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", IFNAME],
                      ["ip", "-n", ns, "link", "set", IFNAME, "up"],
                      ["ip", "-n", ns, "link", "set", "lo", "up"]]
        try:
            for cmd in steps:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            self.down()
            raise RuntimeError(f"{' '.join(e.cmd)}: {e.stderr.strip()}") from None
        return self

    def down(self) -> None:
        """Kill every process in the namespaces (by PID), then remove them (and the link)."""
        for host in self.NAMES:
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for host in self.NAMES:
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True)

    def __enter__(self) -> TwoHosts:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- running things on a host
    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns(host)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    @contextlib.contextmanager
    def hidden(self, host: str, folder: str | os.PathLike):
        """Inside the block, commands started on `host` see an empty private `folder` instead of
        the shared one (a node that has not mounted the shared disk)."""
        Path(folder).mkdir(parents=True, exist_ok=True)  # the mount point, as on a node's own disk
        self._hidden[host].append(str(Path(folder).resolve()))
        try:
            yield
        finally:
            self._hidden[host].pop()

    def command(self, host: str, cmd: list[str]) -> list[str]:
        """`cmd` as it runs on `host` (in its namespace, behind its hidden folders)."""
        wrapped = ["ip", "netns", "exec", self.ns(host)]
        if self._hidden[host]:
            mounts = " && ".join(f"mount -t tmpfs tsd-private {_quote(f)}" for f in self._hidden[host])
            wrapped += ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f'{mounts} && exec "$@"', "sh"]
        return wrapped + cmd

    def run(self, host: str, cmd: list[str], *, env: dict | None = None, **popen) -> subprocess.Popen:
        """Start `cmd` on `host` in a session of its own; `down` kills it if it still runs."""
        env = {**(env or os.environ), "GLOO_SOCKET_IFNAME": IFNAME}
        proc = subprocess.Popen(self.command(host, cmd), env=env, start_new_session=True, **popen)
        self._procs.append(proc)
        return proc

    def check(self, host: str, cmd: list[str], *, env: dict | None = None, timeout: float = 120) -> str:
        """Run `cmd` on `host` to the end; its stdout, or an error with its output."""
        proc = self.run(host, cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise AssertionError(f"{cmd} on {host} timed out:\n{out[-4000:]}") from None
        if proc.returncode != 0:
            raise AssertionError(f"{cmd} on {host} exited {proc.returncode}:\n{out[-4000:]}")
        return out

    def wait_for_port(self, host: str, port: int, timeout: float = 60) -> None:
        """Until something listens on the host's address:port, seen from the other host."""
        other = self.NAMES[1 - self.NAMES.index(host)]
        probe = f"import socket; socket.create_connection(('{self.address(host)}', {port}), timeout=2)"
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(self.command(other, [sys.executable, "-c", probe]), capture_output=True)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {self.address(host)}:{port} after {timeout:.0f}s")
            time.sleep(0.5)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "up":
        net = TwoHosts(sys.argv[2] if len(sys.argv) > 2 else None).up()
        print(f"{net.ns('head')} {net.address('head')}\n{net.ns('node')} {net.address('node')}")
    elif len(sys.argv) == 3 and sys.argv[1] == "down":
        TwoHosts(sys.argv[2]).down()
    else:
        sys.exit("usage: python tests/netns_cluster.py up [PREFIX] | down PREFIX")
