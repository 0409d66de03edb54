"""Real engines started by the test suite itself: a Redis Cluster, a Sentinel group, an HAProxy load
balancer, and the process control they share with tests/served.py's gateways.

Every engine runs as child processes of the test on free loopback ports, in a directory of the test's
own (each process logs there; a failure message quotes the log). Each is a context manager: leaving it
stops every process it started, by PID, whatever happened inside. A missing binary skips the test, or
fails it under CI=true (tests/run installs HAProxy when it may). Every operation blocks until the
engine is there (bounded, polling): from an async test, run it with asyncio.to_thread so that the
test's own clients keep reading meanwhile.

    with RedisCluster(tmp_path / "cluster") as cluster:        # 3 masters, 3 replicas, slots all assigned
        cluster.url                                              # redis+cluster://127.0.0.1:P1,127.0.0.1:P2
        promoted = cluster.kill_master(cluster.node_for_key("k"))
        cluster.migrate_slot(cluster.keyslot("k"), to=other_master)
    with SentinelGroup(tmp_path / "sentinel") as group:         # 1 master, 1 replica, 3 sentinels
        group.url                                                # redis+sentinel://...,.../runbell
        new_master = group.failover(kill=True)
    with LoadBalancer(tmp_path / "lb", ["127.0.0.1:8001", "127.0.0.1:8002"]) as lb:
        httpx.get(lb.url + "/x").headers[SERVED_BY]            # which backend answered
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis
import redis.cluster

from tests.conftest import IN_CI, free_port

T = TypeVar("T")
HOST = "127.0.0.1"
START_SECONDS = 30.0  # the bound on a process becoming ready (well under a second when it works)
SETTLE_SECONDS = 60.0  # the bound on an engine reaching a state (cluster ok, failover done, reload seen)
LOG_TAIL = 3000
SERVED_BY = "X-Served-By"  # the response header the load balancer adds: the backend's "host:port"


def require_binary(name: str) -> str:
    """The binary's path; without it the test is skipped, or failed under CI=true."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        message = f"{name} is not installed (apt-get install {name}; tests/run does as root)"
        if IN_CI:
            pytest.fail(f"{message} and CI=true forbids skipping", pytrace=False)
        pytest.skip(message)
    return path


def wait_until(condition: Callable[[], T], what: str, timeout: float = SETTLE_SECONDS, logs: Callable[[], str] | None = None) -> T:
    """Polls condition() until it returns something truthy, and returns that; an exception it raises
    counts as not yet (the engine may be between states). Fails naming `what`, the last exception and
    the logs when the bound passes."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if held := condition():
                return held
        except Exception as error:  # noqa: BLE001  (not ready yet: retried until the bound)
            last_error = error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            pytest.fail(f"not within {timeout:g} s: {what}{detail}\n{logs() if logs else ''}", pytrace=False)
        time.sleep(0.05)


class ManagedProcess:
    """A child process of the test, signalled by its PID only: hang (SIGSTOP), resume, kill -9, stop."""

    process: subprocess.Popen | None = None
    log: Path

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = LOG_TAIL) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"---- {self.log} (last {chars} characters)\n{text[-chars:]}"

    def _state(self) -> str:
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def hang(self) -> None:
        """SIGSTOP, returning once the process is stopped: its connections stay open, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        wait_until(lambda: self._state() == "T", f"{self.log.parent.name} stopped by SIGSTOP", START_SECONDS)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        wait_until(lambda: self._state() != "T", f"{self.log.parent.name} running after SIGCONT", START_SECONDS)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Sends sig (SIGCONT after it, so a hung process gets it) and returns the exit code; a process
        that outlives the timeout is SIGKILLed and the test fails."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.send_signal(signal.SIGCONT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
            pytest.fail(f"pid {self.pid} outlived signal {sig} by {timeout:g} s\n{self.log_tail()}", pytrace=False)

    def kill(self) -> None:
        """kill -9, returning once it is gone."""
        self.stop(signal.SIGKILL)

    def ensure_stopped(self) -> None:
        """For clean-up: SIGKILL it if it still runs."""
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait(20)


# -- redis-server ----------------------------------------------------------------------------------


class RedisServer(ManagedProcess):
    """redis-server on a port of its own, in a directory of its own (its log is redis.log there), which
    the test can hang, kill and start again on the same port and data. By default it has an append-only
    file (fsync always, no snapshots); with ``persistent=False`` it keeps no data on disk (a restart
    starts it empty). ``args`` are extra command-line options; ``config`` is written to redis.conf and
    loaded first (a sentinel needs a config file it can rewrite; ``sentinel=True`` runs one). client()
    and the readiness check log in as ``username``/``password`` when given."""

    def __init__(
        self,
        directory: Path,
        persistent: bool = True,
        *,
        args: Sequence[str] = (),
        config: str | None = None,
        sentinel: bool = False,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
    ):
        self.directory, self.persistent, self.args, self.sentinel = directory, persistent, list(args), sentinel
        self.username, self.password = username, password  # what client() logs in as (an ACL's user)
        self.port = port or free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.log = directory / "redis.log"
        self.config_file: Path | None = None
        directory.mkdir(parents=True, exist_ok=True)
        if config is not None:
            self.config_file = directory / "redis.conf"
            self.config_file.write_text(config)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def argv(self) -> list[str]:
        argv = [require_binary("redis-server")]
        argv += [str(self.config_file)] if self.config_file else []
        argv += ["--port", str(self.port), "--bind", HOST, "--dir", str(self.directory), "--daemonize", "no", "--logfile", str(self.log)]
        if self.sentinel:
            argv += ["--sentinel"]
        else:
            argv += ["--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always", "--save", ""]
            argv += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not 5 s later
        return argv + self.args

    def spawn(self) -> None:
        """Starts the process without waiting for it (wait_ready does): several start side by side."""
        assert not self.alive, f"{self.address} already runs"
        self.process = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        def answers() -> bool:
            if not self.alive:
                pytest.fail(f"redis-server {self.address} exited\n{self.log_tail()}", pytrace=False)
            with self.client() as client:
                return bool(client.ping())  # answers once the AOF is loaded (LOADING errors before)

        wait_until(answers, f"redis-server {self.address} answering", START_SECONDS, self.log_tail)

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain client of this one server (decoded strings), with short timeouts."""
        login = {"username": self.username, "password": self.password}
        options: dict = {"socket_timeout": 2, "socket_connect_timeout": 2, "decode_responses": True, **login, **kwargs}
        return redis.Redis(host=HOST, port=self.port, **options)

    def info(self, section: str) -> dict:
        with self.client() as client:
            return client.info(section)

    def in_sync_replica(self) -> bool:
        """A replica whose link to its master is up and whose initial sync is over."""
        replication = self.info("replication")
        return (
            replication.get("role") == "slave"
            and replication.get("master_link_status") == "up"
            and not replication.get("master_sync_in_progress")
        )


def start_own_redis(directory: Path, persistent: bool = True, args: Sequence[str] = ()) -> Iterator[RedisServer]:
    """A started RedisServer, killed after the test (a missing redis-server fails under CI=true);
    ``args`` are more of redis-server's options (``--replicaof``)."""
    server = RedisServer(directory, persistent, args=args)
    server.start()
    try:
        yield server
    finally:
        server.ensure_stopped()


class Engine:
    """Several processes started together and all stopped on leaving the `with`, whatever happened."""

    def processes(self) -> list[ManagedProcess]:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def logs(self) -> str:
        return "\n".join(process.log_tail(1500) for process in self.processes())

    def stop(self) -> None:
        for process in self.processes():
            if process.alive:
                process.stop(signal.SIGKILL)  # test data only: nothing to shut down cleanly

    def __enter__(self: T) -> T:
        assert isinstance(self, Engine)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- Redis Cluster ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster sees it (CLUSTER NODES)."""

    node_id: str
    port: int
    role: str  # "master" or "replica"
    master_id: str | None  # a replica's master
    slots: tuple[tuple[int, int], ...]  # inclusive ranges a master serves
    failed: bool  # flagged fail (or fail?) by the node asked

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_cluster_nodes(text: str) -> list[ClusterNode]:
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        node_id, address, flags, master = fields[:4]
        flag_set = set(flags.split(","))
        ranges = []
        for item in fields[8:]:
            if item.startswith("["):  # an importing/migrating marker, not an owned slot
                continue
            first, _, last = item.partition("-")
            ranges.append((int(first), int(last or first)))
        port = int(address.split("@")[0].rsplit(":", 1)[1])
        role = "master" if "master" in flag_set else "replica"
        nodes.append(
            ClusterNode(
                node_id=node_id,
                port=port,
                role=role,
                master_id=None if master == "-" else master,
                slots=tuple(sorted(ranges)),
                failed=bool(flag_set & {"fail", "fail?"}),
            )
        )
    return sorted(nodes, key=lambda node: node.port)


class RedisCluster(Engine):
    """A Redis Cluster of `masters` masters with `replicas` replicas each (3 + 3 by default), made by
    `redis-cli --cluster create`; ready once every node reports cluster_state:ok, all agree on who serves
    which slot, and every replica is in sync. No persistence: a restarted node resyncs from its master."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000):
        self.directory, self.masters_count, self.replicas_per_master = directory, masters, replicas
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(node_timeout_ms)]
        self.servers = [
            # A bus port of its own: the default, port + 10000, may be taken or past 65535.
            RedisServer(directory / f"node-{i}", persistent=False, args=[*args, "--cluster-port", str(free_port())])
            for i in range(masters * (1 + replicas))
        ]
        self.create_log = directory / "cluster-create.log"

    def processes(self) -> list[ManagedProcess]:
        return list(self.servers)

    @property
    def url(self) -> str:
        """The seed URL: two of the first masters (the cluster tells the client about the rest)."""
        return "redis+cluster://" + ",".join(server.address for server in self.servers[:2])

    @property
    def startup_nodes(self) -> list[redis.cluster.ClusterNode]:
        return [redis.cluster.ClusterNode(HOST, server.port) for server in self.servers[:2]]

    def client(self, **kwargs: object) -> redis.cluster.RedisCluster:
        """redis-py's cluster client on the seed nodes (decoded strings)."""
        options: dict = {"decode_responses": True, "socket_timeout": 2, "socket_connect_timeout": 2, **kwargs}
        return redis.cluster.RedisCluster(startup_nodes=self.startup_nodes, **options)

    def server(self, port: int) -> RedisServer:
        (server,) = [server for server in self.servers if server.port == port]
        return server

    def start(self) -> None:
        cli = require_binary("redis-cli")
        for server in self.servers:
            server.spawn()
        for server in self.servers:
            server.wait_ready()
        argv = [cli, "--cluster", "create", *(s.address for s in self.servers)]
        argv += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        with open(self.create_log, "w") as log:
            created = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=SETTLE_SECONDS, check=False)
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{self.create_log.read_text()[-LOG_TAIL:]}", pytrace=False)
        self.wait_healthy()

    # -- what the cluster says --------------------------------------------------------------------

    def alive_servers(self) -> list[RedisServer]:
        return [server for server in self.servers if server.alive]

    def nodes(self, port: int | None = None) -> list[ClusterNode]:
        """Every node as one live node (the first, or the one on `port`) sees it."""
        server = self.server(port) if port else self.alive_servers()[0]
        with server.client() as client:
            return parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))

    def masters(self) -> list[ClusterNode]:
        """The masters that serve slots and are not failed, by port."""
        return [node for node in self.nodes() if node.role == "master" and node.slots and not node.failed]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        return [node for node in self.nodes() if node.master_id == master.node_id and not node.failed]

    def keyslot(self, key: str) -> int:
        with self.alive_servers()[0].client() as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def node_for_slot(self, slot: int) -> ClusterNode:
        (owner,) = [node for node in self.masters() if node.serves(slot)]
        return owner

    def node_for_key(self, key: str) -> ClusterNode:
        """The master serving the key's hash slot now."""
        return self.node_for_slot(self.keyslot(key))

    def slot_map(self, port: int) -> dict[tuple[int, int], int]:
        """The slot ranges and the port of the master serving each, as the node on `port` sees it."""
        return {r: node.port for node in self.nodes(port) if node.role == "master" and not node.failed for r in node.slots}

    def healthy(self) -> bool:
        """Every live node: cluster_state:ok, and the same view of the live nodes (roles, masters) and of
        the slots (all 16384, served by live masters only); every live replica in sync."""
        servers = self.alive_servers()
        live_ports = {server.port for server in servers}
        views, maps = [], []
        for server in servers:
            with server.client() as client:
                if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return False
            nodes = [node for node in self.nodes(server.port) if node.port in live_ports and not node.failed]
            views.append(sorted((node.port, node.role, node.master_id, node.slots) for node in nodes))
            maps.append(self.slot_map(server.port))
        if any(view != views[0] for view in views) or len(views[0]) != len(servers):
            return False  # a live node missing from a view, or seen in another role
        if any(m != maps[0] for m in maps) or sum(last - first + 1 for first, last in maps[0]) != 16384:
            return False
        if set(maps[0].values()) - live_ports:
            return False  # a dead master still serves slots
        if any(role == "master" and not slots for _, role, _, slots in views[0]):
            return False  # a node not yet made a replica (or an empty master)
        return all(self.server(port).in_sync_replica() for port, role, _, _ in views[0] if role == "replica")

    def wait_healthy(self, timeout: float = SETTLE_SECONDS) -> None:
        wait_until(self.healthy, "the cluster ok on every node, one slot map, replicas in sync", timeout, self.logs)

    # -- faults and changes -----------------------------------------------------------------------

    def kill_master(self, master: ClusterNode | None = None) -> ClusterNode:
        """kill -9 a master (the first by default); returns the replica promoted in its place, once the
        cluster is healthy again."""
        master = master or self.masters()[0]
        replicas = {node.node_id for node in self.replicas_of(master)}
        assert replicas, f"{master.address} has no replica to promote"
        self.server(master.port).kill()

        def promoted() -> ClusterNode | None:
            owners = [node for node in self.masters() if node.node_id in replicas and node.slots == master.slots]
            return owners[0] if owners and self.healthy() else None

        return wait_until(promoted, f"a replica of {master.address} promoted, cluster ok", logs=self.logs)

    def restart_node(self, port: int) -> ClusterNode:
        """Starts a killed node again on its port (it keeps its nodes.conf, not its data); it rejoins,
        a former master as a replica of the one promoted in its place. Returns it once healthy."""
        self.server(port).start()
        self.wait_healthy()
        (node,) = [node for node in self.nodes() if node.port == port]
        return node

    def begin_slot_migration(self, slot: int, to: ClusterNode) -> SlotMigration:
        """Marks the slot IMPORTING on `to` and MIGRATING on its owner: keys then move one batch at a
        time (clients get ASK redirects for moved keys) until finish()."""
        source = self.node_for_slot(slot)
        assert source.node_id != to.node_id, f"slot {slot} is already on {to.address}"
        with self.server(to.port).client() as target:
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        with self.server(source.port).client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", to.node_id)
        return SlotMigration(self, slot, source, to)

    def migrate_slot(self, slot: int, to: ClusterNode) -> int:
        """Moves one slot, keys and all, from its master to `to`; returns how many keys moved, once every
        node agrees on the new owner."""
        migration = self.begin_slot_migration(slot, to)
        moved = 0
        while batch := migration.move_keys():
            moved += batch
        migration.finish()
        return moved


@dataclass
class SlotMigration:
    """A slot being moved (CLUSTER SETSLOT IMPORTING/MIGRATING, then MIGRATE, then SETSLOT NODE)."""

    cluster: RedisCluster
    slot: int
    source: ClusterNode
    target: ClusterNode

    def move_keys(self, batch: int = 100) -> int:
        """MIGRATEs up to `batch` of the slot's keys still on the source; returns how many (0: none left)."""
        with self.cluster.server(self.source.port).client() as client:
            keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, batch)
            if keys:
                client.execute_command("MIGRATE", HOST, self.target.port, "", 0, 5000, "KEYS", *keys)
        return len(keys)

    def finish(self) -> None:
        """SETSLOT NODE on the target, the source, then every other master; waits until every node agrees."""
        masters = [self.target, self.source] + [
            m for m in self.cluster.masters() if m.node_id not in (self.target.node_id, self.source.node_id)
        ]
        for master in masters:
            with self.cluster.server(master.port).client() as client:
                client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target.node_id)

        def agreed() -> bool:
            return (
                all(
                    [n.port for n in self.cluster.nodes(s.port) if n.role == "master" and n.serves(self.slot)] == [self.target.port]
                    for s in self.cluster.alive_servers()
                )
                and self.cluster.healthy()
            )

        wait_until(agreed, f"slot {self.slot} on {self.target.address} for every node", logs=self.cluster.logs)


# -- Redis Sentinel --------------------------------------------------------------------------------


class SentinelGroup(Engine):
    """A master, a replica and `sentinels` sentinels (quorum 2) watching them under `master_name`;
    ready once the replica is in sync and every sentinel knows the replica and the other sentinels.
    Small down-after and failover timeouts, so that a failover takes seconds."""

    def __init__(
        self,
        directory: Path,
        master_name: str = "runbell",
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ):
        self.directory, self.master_name = directory, master_name
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        first = RedisServer(directory / "redis-0", persistent=False)
        second = RedisServer(directory / "redis-1", persistent=False, args=["--replicaof", HOST, str(first.port)])
        self.servers = [first, second]
        self.sentinels = [RedisServer(directory / f"sentinel-{i}", sentinel=True, config="") for i in range(sentinels)]

    def processes(self) -> list[ManagedProcess]:
        return [*self.servers, *self.sentinels]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + "/" + self.master_name

    def sentinel_config(self, master: RedisServer) -> str:
        name = self.master_name
        return (
            f"sentinel monitor {name} {HOST} {master.port} 2\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )

    def start(self) -> None:
        master, replica = self.servers
        for server in self.servers:
            server.spawn()
        for server in self.servers:
            server.wait_ready()
        wait_until(replica.in_sync_replica, "the replica in sync", logs=self.logs)
        for sentinel in self.sentinels:
            assert sentinel.config_file is not None
            sentinel.config_file.write_text(self.sentinel_config(master))
            sentinel.spawn()
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        self.wait_watched()

    def watching(self, master_port: int, replicas: int) -> bool:
        """Every live sentinel sees that master up, with that many replicas up, and every other sentinel."""
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            with sentinel.client() as client:
                state = client.sentinel_master(self.master_name)
                seen = client.sentinel_slaves(self.master_name)
            up = [r for r in seen if r["flags"] == "slave" and r["master-link-status"] == "ok"]
            if (
                state["port"] != master_port
                or state["flags"] != "master"
                or len(up) < replicas
                or state["num-other-sentinels"] != len(self.sentinels) - 1
            ):
                return False
        return True

    def wait_watched(self) -> None:
        master = self.master()
        replicas = sum(1 for s in self.servers if s.alive and s is not master)
        wait_until(
            lambda: self.watching(master.port, replicas), "every sentinel watching the master, replica and each other", logs=self.logs
        )

    def master_port(self) -> int:
        """The master's port, as the first live sentinel reports it."""
        sentinel = next(s for s in self.sentinels if s.alive)
        with sentinel.client() as client:
            _, port = client.sentinel_get_master_addr_by_name(self.master_name)
        return int(port)

    def master(self) -> RedisServer:
        (server,) = [s for s in self.servers if s.port == self.master_port()]
        return server

    def replica(self) -> RedisServer:
        master = self.master()
        (server,) = [s for s in self.servers if s is not master]
        return server

    def sentinel_client(self, **kwargs: object) -> redis.Sentinel:
        """redis-py's Sentinel on the group's sentinels (master_for / slave_for with the master name)."""
        options: dict = {"socket_timeout": 2, "socket_connect_timeout": 2, "decode_responses": True, **kwargs}
        return redis.Sentinel([(HOST, s.port) for s in self.sentinels], **options)

    def failover(self, kill: bool = False) -> RedisServer:
        """Moves the master to the replica: SENTINEL FAILOVER, or with kill=True kill -9 the master and
        let the sentinels notice. Returns the new master (wait_new_master); after a SENTINEL FAILOVER,
        once the old master is also its replica in sync (the sentinels demote it on their next INFO
        round, up to 10 s later: until then it still takes writes)."""
        old = self.master()
        if kill:
            old.kill()
        else:
            with self.sentinels[0].client() as client:
                client.sentinel_failover(self.master_name)
        new = self.wait_new_master(old)
        if not kill:
            wait_until(old.in_sync_replica, f"the old master {old.address} a replica in sync", logs=self.logs)
        return new

    def wait_new_master(self, old: RedisServer) -> RedisServer:
        """Waits until every live sentinel reports a master other than `old`, and it takes a write."""

        def moved() -> RedisServer | None:
            ports = set()
            for sentinel in self.sentinels:
                if sentinel.alive:
                    with sentinel.client() as client:
                        ports.add(int(client.sentinel_get_master_addr_by_name(self.master_name)[1]))
            if len(ports) != 1 or old.port in ports:
                return None
            (new,) = [s for s in self.servers if s.port in ports]
            with new.client() as client:
                probe = "rbengines:failover-probe"
                client.set(probe, "1", px=1000)  # a READONLY error until it is a master
                client.delete(probe)
            return new

        return wait_until(moved, f"sentinels reporting a new master in place of {old.address}, taking writes", logs=self.logs)

    def restart(self, server: RedisServer) -> None:
        """Starts a killed server again, empty, as a replica of the current master (what the sentinels
        would make it); returns once it is in sync and every sentinel has seen it so (their INFO round
        of a replica is every 10 s, so this takes up to that)."""
        master = self.master()
        replicaof = server.args.index("--replicaof") if "--replicaof" in server.args else len(server.args)
        server.args[replicaof : replicaof + 3] = ["--replicaof", HOST, str(master.port)]
        server.start()
        wait_until(server.in_sync_replica, f"{server.address} back as a replica in sync", logs=self.logs)
        self.wait_watched()

    @contextlib.contextmanager
    def lagging_replica(self) -> Iterator[RedisServer]:
        """Inside the block the replica is stopped (SIGSTOP) and its link to the master cut (CLIENT KILL
        TYPE replica), so writes to the master meanwhile stay there alone: a failover before it catches
        up loses them. On leaving, SIGCONT: with the master alive it reconnects and catches up."""
        replica, master = self.replica(), self.master()
        replica.hang()
        try:
            with master.client() as client:
                client.client_kill_filter(_type="replica")
                wait_until(lambda: client.info("replication")["connected_slaves"] == 0, "the replica cut off", logs=self.logs)
            yield replica
        finally:
            if replica.alive:
                replica.resume()


# -- HAProxy ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendStats:
    address: str  # "host:port", also the server's name in HAProxy
    status: str  # UP, DOWN, MAINT, "no check", ...
    sessions_total: int  # requests (streams) sent to it since the last start or reload
    sessions_now: int


class HAProxyProcess(ManagedProcess):
    def __init__(self, log: Path):
        self.log = log


class LoadBalancer(Engine):
    """HAProxy (master-worker) on a free port in front of `backends` ("host:port"), round robin with no
    stickiness: each request, keep-alive or not, goes to the next backend. Long client, server and
    tunnel timeouts, and nothing buffered, so SSE and long polls pass through as they are written.
    With `health_path`, a backend failing `GET health_path` twice is taken out until it answers again;
    a request whose connection is refused is retried on another backend. Each response carries the
    backend that served it in the X-Served-By header; stats() counts per backend."""

    def __init__(self, directory: Path, backends: Sequence[str], health_path: str | None = None, check_interval_ms: int = 500):
        self.directory, self.health_path, self.check_interval_ms = directory, health_path, check_interval_ms
        self.backends = list(backends)
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.stats_url = f"http://{HOST}:{self.stats_port}/stats"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_file, self.admin_socket = directory / "haproxy.cfg", directory / "admin.sock"
        self.haproxy = HAProxyProcess(directory / "haproxy.log")

    def processes(self) -> list[ManagedProcess]:
        return [self.haproxy]

    def config(self) -> str:
        check = f" check inter {self.check_interval_ms} fall 2 rise 1" if self.health_path else ""
        servers = "".join(f"    server {address} {address}{check}\n" for address in self.backends)
        health = f"    option httpchk GET {self.health_path}\n    http-check expect status 200\n" if self.health_path else ""
        return (
            "global\n"
            "    nbthread 1\n"
            f"    stats socket {self.admin_socket} mode 600 level admin\n"
            "    hard-stop-after 30s\n"
            "defaults\n"
            "    mode http\n"
            "    timeout connect 2s\n"
            "    timeout http-request 10s\n"
            "    timeout queue 10s\n"
            "    timeout client 1h\n"
            "    timeout server 1h\n"
            "    timeout tunnel 1h\n"
            "    retries 2\n"
            "    option redispatch 1\n"
            "frontend runbell\n"
            f"    bind {HOST}:{self.port}\n"
            "    default_backend gateways\n"
            "backend gateways\n"
            "    balance roundrobin\n"
            f"    http-response set-header {SERVED_BY} %s\n"
            f"{health}{servers}"
            "listen stats\n"
            f"    bind {HOST}:{self.stats_port}\n"
            "    stats enable\n"
            "    stats uri /stats\n"
        )

    def start(self) -> None:
        haproxy = require_binary("haproxy")
        self.config_file.write_text(self.config())
        checked = subprocess.run([haproxy, "-c", "-f", str(self.config_file)], capture_output=True, text=True, timeout=30, check=False)
        assert checked.returncode == 0, f"haproxy refused its config:\n{checked.stdout}{checked.stderr}\n{self.config()}"
        with open(self.haproxy.log, "a") as log:
            self.haproxy.process = subprocess.Popen(
                [haproxy, "-W", "-db", "-f", str(self.config_file)], stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_serving(self.backends)

    def stop(self) -> None:
        if self.haproxy.alive:
            self.haproxy.stop(signal.SIGTERM)  # the master stops its workers (a SIGKILL would orphan them)

    def stats(self) -> dict[str, BackendStats]:
        """The backends' counters, by "host:port" (the stats page's CSV)."""
        rows = csv.DictReader(io.StringIO(httpx.get(self.stats_url + ";csv", timeout=5).text.lstrip("# ")))
        return {
            row["svname"]: BackendStats(row["svname"], row["status"], int(row["stot"] or 0), int(row["scur"] or 0))
            for row in rows
            if row["pxname"] == "gateways" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_serving(self, backends: Sequence[str]) -> None:
        def serving() -> bool:
            if not self.haproxy.alive:
                pytest.fail(f"haproxy exited\n{self.haproxy.log_tail()}", pytrace=False)
            return set(self.stats()) == set(backends)

        wait_until(serving, f"haproxy serving {list(backends)}", START_SECONDS, self.logs)

    def reload(self, backends: Sequence[str]) -> None:
        """Rewrites the config with these backends and reloads it (SIGUSR2 to the master): streams open
        on the old worker go on there (up to hard-stop-after), new requests go to the new backends."""
        self.backends = list(backends)
        self.config_file.write_text(self.config())
        self.haproxy.process.send_signal(signal.SIGUSR2)  # type: ignore[union-attr]
        self.wait_serving(self.backends)

    def command(self, line: str) -> str:
        """One command of HAProxy's runtime API (the admin socket), e.g. "show servers state"."""
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(str(self.admin_socket))
            admin.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := admin.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def set_state(self, backend: str, state: str) -> None:
        """Takes a backend out ("maint": no new requests; "drain": only its sticky ones) or back ("ready")."""
        answer = self.command(f"set server gateways/{backend} state {state}")
        assert not answer.strip(), answer
        wanted = {"maint": "MAINT", "drain": "DRAIN"}.get(state)
        wait_until(
            lambda: (self.stats()[backend].status == wanted) if wanted else "MAINT" not in self.stats()[backend].status,
            f"{backend} {state}",
        )
