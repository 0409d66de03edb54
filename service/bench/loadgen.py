"""The load generator: worker processes, not the gateway's event loop, holding the callers' connections.

Each worker is a `python -c` process running worker_main() and speaks JSON lines: a command on stdin, one reply
on stdout. It holds its share of the connections as bare asyncio protocols over raw HTTP/1.1 (httpx
costs about a millisecond per response, which would be measured as gateway latency), and stamps each
arrival with time.perf_counter(): on Linux that is CLOCK_MONOTONIC, one clock for the whole machine,
so an arrival stamped in a worker and a publish stamped in the parent can be subtracted.

Commands (replies in brackets):
  {"cmd": "open", "mode": "long-poll"|"sse"|"poll", "paths": [...], "interval": s, "at": [t, ...]}  [{"opened", "failed", "error"}]
      long-poll: GET, one response; sse: GET, then every event (open answers once the stream's first
      comment arrived, i.e. once the gateway has subscribed it); poll: GET every `interval` seconds
      (first at a random phase) on one keep-alive connection until the body shows a decided outcome.
      With "at" (perf_counter times, one per path): each connection is opened at its time, and its
      connect is recorded as a "connect" event.
  {"cmd": "await", "event": name, "count": k, "timeout": s}  [{"reached": bool}]
      until every connection opened since the last collect has had `k` events of that name (or ended);
      with "total": n, until n such events arrived in all.
  {"cmd": "collect", "timeout": s}  [{"records": [[index, seq, event, t], ...], "unfinished": n}]
      until every connection has ended (or the timeout), then closes them all; indexes restart at 0.
  {"cmd": "quit"}
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECT_CONCURRENCY = 200  # connects in flight per worker: more overflows the gateway's listen backlog
DECIDED = (b'"outcome":"success"', b'"outcome":"failed"')  # in GET /v1/dags/{d}/runs/{r} (compact JSON)
CONNECTIONS_PER_WORKER = 2500
# A worker's entry: imported, not run with -m, so that the package's own imports do not come first.
WORKER = "from runbell.service.bench.loadgen import worker_main; worker_main()"
# Loopback source addresses, from this one on, once the connections outnumber one address's ephemeral
# ports: the kernel tells connections to one destination apart by their source (address, port), and one
# address has only ip_local_port_range's ports (28,232 here). 127.0.0.0/8 all routes to `lo`, unconfigured.
FIRST_SOURCE = ipaddress.IPv4Address("127.0.0.2")
PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORTS_KEPT_FREE = 0.1  # of each address's ports: closed connections linger in TIME_WAIT, others connect too
# Linux's IP_BIND_ADDRESS_NO_PORT (Python has the name from 3.12): bind() takes the source address only and
# the port is picked at connect(), unique per destination, instead of at bind(), unique per address.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ephemeral_ports() -> int:
    """How many ephemeral ports one source address has (ip_local_port_range, both ends included)."""
    low, high = map(int, PORT_RANGE.read_text().split())
    return high - low + 1


def source_addresses(connections: int, ports_per_address: int) -> list[str | None]:
    """The loopback source addresses `connections` to one destination are spread over, each given at
    most `ports_per_address` less PORTS_KEPT_FREE of them. [None] where one address has the room: the
    kernel's own choice (127.0.0.1), as before; else 127.0.0.2, 127.0.0.3 and so on."""
    room = int(ports_per_address * (1 - PORTS_KEPT_FREE))
    if connections <= room:
        return [None]
    return [str(FIRST_SOURCE + i) for i in range(-(-connections // room))]


# -- the worker: connections ------------------------------------------------------------------------


class Worker:
    """This process's connections and what arrived on them."""

    def __init__(self, host: str, port: int, sources: Sequence[str | None] = (None,)):
        self.host, self.port = host, port
        self.sources = list(sources)  # dealt round-robin to this worker's connections
        self.made = 0  # connections made so far: the next one's source address
        self.records: list[list[Any]] = []  # [index, seq, event, perf_counter]
        self.totals: dict[str, int] = {}  # arrivals by event name, over all connections
        self.connections: list[Connection] = []
        self.ended = 0
        self.watch: tuple[str, int] | None = None  # (event, count) an await is waiting for
        self.satisfied = 0  # connections that have had it (or ended)
        self.changed = asyncio.Event()

    def satisfies(self, connection: Connection) -> bool:
        assert self.watch is not None
        event, count = self.watch
        return connection.finished or connection.counts.get(event, 0) >= count

    def progress(self, connection: Connection, was_satisfied: bool) -> None:
        """After an arrival or an end: kept incrementally, as a scan per arrival would be quadratic."""
        if self.watch is not None and not was_satisfied and self.satisfies(connection):
            self.satisfied += 1
        self.changed.set()

    async def open(self, mode: str, paths: list[str], interval: float, at: list[float] | None = None) -> dict[str, Any]:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        kind = {"long-poll": LongPoll, "sse": Stream, "poll": Poller}[mode]
        fresh = [kind(self, len(self.connections) + i, path, interval) for i, path in enumerate(paths)]
        self.connections.extend(fresh)
        failures: list[str] = []

        async def one(connection: Connection, when: float | None) -> None:
            if when is not None:
                await asyncio.sleep(when - time.perf_counter())
                connection.record(0, "connect", time.perf_counter())
            async with gate:
                try:
                    await self.connect(connection)
                    await connection.ready
                except OSError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    connection.finish()

        await asyncio.gather(*(one(c, at[i] if at else None) for i, c in enumerate(fresh)))
        return {"opened": len(paths) - len(failures), "failed": len(failures), "error": failures[0] if failures else None}

    async def connect(self, connection: Connection) -> None:
        """Connect from the next source address (the kernel's choice where it is None)."""
        loop = asyncio.get_running_loop()
        source = self.sources[self.made % len(self.sources)]
        self.made += 1
        if source is None:
            await loop.create_connection(lambda: connection, self.host, self.port)
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        await loop.create_connection(lambda: connection, sock=sock)

    async def until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Until done() holds (checked at each arrival) or the timeout passes."""
        deadline = time.monotonic() + timeout
        while not done():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return done()
        return True

    async def await_events(self, event: str, count: int, timeout: float, total: int | None = None) -> dict[str, Any]:
        if total is not None:  # that many arrivals in all, whichever connections they came on
            return {"reached": await self.until(lambda: self.totals.get(event, 0) >= total, timeout)}
        self.watch = (event, count)
        self.satisfied = sum(1 for c in self.connections if self.satisfies(c))
        try:
            return {"reached": await self.until(lambda: self.satisfied >= len(self.connections), timeout)}
        finally:
            self.watch = None

    async def collect(self, timeout: float) -> dict[str, Any]:
        await self.until(lambda: self.ended >= len(self.connections), timeout)
        unfinished = sum(1 for c in self.connections if not c.finished)
        for connection in self.connections:
            connection.finished = True  # its connection_lost comes later and must not count in the next batch
            connection.close()
        records, self.records, self.connections, self.ended, self.totals = self.records, [], [], 0, {}
        return {"records": records, "unfinished": unfinished}


class Connection(asyncio.Protocol):
    """One caller: sends its request when connected, parses what comes back."""

    def __init__(self, worker: Worker, index: int, path: str, interval: float):
        self.worker, self.index, self.path, self.interval = worker, index, path, interval
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.finished = False
        self.counts: dict[str, int] = {}

    def request(self) -> bytes:
        return f"GET {self.path} HTTP/1.1\r\nHost: {self.worker.host}\r\n\r\n".encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport is not an asyncio.Transport
        transport.write(self.request())  # type: ignore[attr-defined]  # it is a Transport (see above)
        self.on_connected()

    def on_connected(self) -> None:
        self.set_ready()

    def set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def record(self, seq: int, event: str, t: float) -> None:
        was = self.worker.watch is not None and self.worker.satisfies(self)
        self.counts[event] = self.counts.get(event, 0) + 1
        self.worker.totals[event] = self.worker.totals.get(event, 0) + 1
        self.worker.records.append([self.index, seq, event, t])
        self.worker.progress(self, was)

    def finish(self) -> None:
        if not self.finished:
            was = self.worker.watch is not None and self.worker.satisfies(self)
            self.finished = True
            self.worker.ended += 1
            self.worker.progress(self, was)
        self.set_ready()
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()


def parse_response(buffer: bytes) -> tuple[int, bytes, bytes] | None:
    """(status, body, rest) once a whole Content-Length response is in the buffer, else None."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[:head_end].split(b"\r\n")
    status = int(head[0].split()[1])
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    end = head_end + 4 + length
    if len(buffer) < end:
        return None
    return status, buffer[head_end + 4 : end], buffer[end:]


def response_event(status: int) -> str:
    return {200: "outcome", 202: "pending"}.get(status, f"http-{status}")


class LongPoll(Connection):
    """A long-poll waiter: one response, stamped when its whole body has arrived."""

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        self.buffer += data
        parsed = parse_response(self.buffer)
        if parsed is not None:
            self.record(0, response_event(parsed[0]), t)
            self.finish()


class Stream(Connection):
    """An SSE client: each event stamped as its `event:` line arrives (sse-starlette writes `id:`
    first). Lines are scanned whole, so the chunked framing between them does not matter."""

    seq = 0

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        lines = (self.buffer + data).split(b"\r\n")
        self.buffer = lines.pop()  # an unfinished line
        for line in lines:
            if line.startswith(b"id: "):
                seq = line[4:].rpartition(b"-")[2]  # the id is EPOCH-SEQ (one epoch per run here)
                self.seq = int(seq) if seq.isdigit() else 0
            elif line.startswith(b"event: "):
                event = line[7:].decode()
                self.record(self.seq, event, t)
                if event == "end":
                    self.finish()
            elif line.startswith(b": "):
                self.set_ready()  # the stream's first comment: the gateway has subscribed it
            elif line.startswith(b"HTTP/1.1 ") and not line.startswith(b"HTTP/1.1 200"):
                self.record(0, f"http-{int(line.split()[1])}", t)
                self.finish()

    def on_connected(self) -> None:
        pass  # ready once the first comment arrives


class Poller(Connection):
    """What a user writes by hand: read the run every `interval` seconds until it has an outcome."""

    def on_connected(self) -> None:
        self.polls = 0
        self.set_ready()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport is not an asyncio.Transport
        loop = asyncio.get_running_loop()
        self.handle = loop.call_later(random.uniform(0, self.interval), self.poll)  # a random phase
        self.on_connected()

    def poll(self) -> None:
        if self.transport is not None and not self.finished:
            self.polls += 1
            self.transport.write(self.request())

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        self.buffer += data
        parsed = parse_response(self.buffer)
        if parsed is None:
            return
        status, body, self.buffer = parsed
        if status == 200 and any(mark in body for mark in DECIDED):
            self.record(self.polls, "outcome", t)
            self.finish()
        else:
            self.handle = asyncio.get_running_loop().call_later(self.interval, self.poll)

    def close(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.cancel()
        super().close()


async def serve_commands(host: str, port: int, sources: list[str | None]) -> None:
    worker = Worker(host, port, sources)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        cmd = command["cmd"]
        if cmd == "open":
            reply = await worker.open(command["mode"], command["paths"], command.get("interval", 0.0), command.get("at"))
        elif cmd == "await":
            reply = await worker.await_events(command["event"], command["count"], command["timeout"], command.get("total"))
        elif cmd == "collect":
            reply = await worker.collect(command["timeout"])
        else:
            return
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when installed, as the gateway does (uvicorn picks it): less overhead of our own."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def worker_main() -> None:
    raise_fd_limit()
    run_loop(serve_commands(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]) if len(sys.argv) > 3 else [None]))


# -- the parent: a pool of workers ------------------------------------------------------------------


def rotated(sources: list[str | None], w: int) -> list[str | None]:
    """Worker w's turn of the source addresses, starting at its own: connections are dealt round-robin to
    the workers, so each address gets an equal share of them all, not only of each worker's."""
    k = w % len(sources)
    return sources[k:] + sources[:k]


@dataclass(frozen=True)
class Arrival:
    path: int  # index into the paths given to open, in order, since the last collect
    seq: int  # SSE: the event's id; poll: how many reads it took; long-poll: 0
    event: str
    t: float  # time.perf_counter() in the worker (CLOCK_MONOTONIC: comparable across processes)


class LoadGen:
    """Worker processes sharing the connections round-robin; every call waits for all of them.

    Several ports (gateways side by side): worker w connects to ports[w % len(ports)], so with a multiple
    of len(ports) workers, path i goes to gateway i % len(ports), as a load balancer without stickiness
    deals them."""

    def __init__(self, host: str, port: int | Sequence[int], workers: int, sources: Sequence[str | None] = (None,)):
        raise_fd_limit()
        ports = [port] if isinstance(port, int) else list(port)
        self.sources = list(sources)  # each worker deals its connections over all of them, from its own turn
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, host, str(ports[w % len(ports)]), json.dumps(rotated(self.sources, w))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for w in range(workers)
        ]
        self.indexes: list[list[int]] = [[] for _ in self.procs]  # per worker: its connections' path indexes
        self.opened = 0

    @staticmethod
    def for_connections(host: str, port: int, connections: int) -> LoadGen:
        """Workers for `connections` callers, over as many loopback source addresses as their ports need."""
        workers = max(1, -(-connections // CONNECTIONS_PER_WORKER))
        return LoadGen(host, port, workers, source_addresses(connections, ephemeral_ports()))

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def _ask(self, commands: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
        """Send each worker its command (None: nothing), then read the replies."""
        for proc, command in zip(self.procs, commands):
            if command is not None:
                proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]  # the workers are started with stdin and stdout PIPEs
                proc.stdin.flush()  # type: ignore[union-attr]
        replies = []
        for proc, command in zip(self.procs, commands):
            if command is not None:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise RuntimeError("a load generator worker died")
                replies.append(json.loads(line))
        return replies

    def open(self, mode: str, paths: list[str], interval: float = 0.0, at: list[float] | None = None) -> dict[str, Any]:
        """Open one connection per path, dealt round-robin to the workers; how many opened and failed.
        `at`: when to open each (perf_counter times); the call returns once the last has opened."""
        shares: list[list[str]] = [[] for _ in self.procs]
        times: list[list[float]] = [[] for _ in self.procs]
        for i, path in enumerate(paths):
            w = i % len(self.procs)
            shares[w].append(path)
            times[w].append(at[i] if at else 0.0)
            self.indexes[w].append(self.opened + i)
        self.opened += len(paths)
        replies = self._ask(
            [
                {"cmd": "open", "mode": mode, "paths": share, "interval": interval, **({"at": times[w]} if at else {})} if share else None
                for w, share in enumerate(shares)
            ]
        )
        errors = [r["error"] for r in replies if r["error"]]
        return {
            "opened": sum(r["opened"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "error": errors[0] if errors else None,
        }

    def await_events(self, event: str, count: int = 1, timeout: float = 60.0) -> bool:
        """Until every open connection has had `count` events of this name; False at the timeout."""
        replies = self._ask(
            [
                {"cmd": "await", "event": event, "count": count, "timeout": timeout} if self.indexes[w] else None
                for w in range(len(self.procs))
            ]
        )
        return all(r["reached"] for r in replies)

    def await_paths(self, event: str, paths: set[int], timeout: float = 60.0) -> bool:
        """Until the connections of these paths (indexes as given to open) have had the event, once each."""
        commands: list[dict[str, Any] | None] = []
        for indexes in self.indexes:
            total = sum(1 for i in indexes if i in paths)
            commands.append({"cmd": "await", "event": event, "count": 1, "total": total, "timeout": timeout} if total else None)
        return all(r["reached"] for r in self._ask(commands))

    def collect(self, timeout: float = 60.0) -> tuple[list[Arrival], int]:
        """Every arrival since the last collect, and how many connections had not ended; closes them all."""
        replies = self._ask([{"cmd": "collect", "timeout": timeout} for _ in self.procs])
        arrivals = [Arrival(self.indexes[w][i], seq, event, t) for w, reply in enumerate(replies) for i, seq, event, t in reply["records"]]
        unfinished = sum(r["unfinished"] for r in replies)
        self.indexes, self.opened = [[] for _ in self.procs], 0
        return arrivals, unfinished

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except (BrokenPipeError, ValueError):
                pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
