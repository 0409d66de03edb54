"""RUNBELL_REDIS_URL into Redis clients, the same for the hook, the gateway and the CLI.

Accepted shapes (``ACCEPTED``):

- ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://…`` (TLS), ``unix://[[USER]:PASSWORD@]/PATH[?db=DB]``:
  one Redis node, as redis-py reads them;
- ``redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…][/][?ssl=true]``: Redis Cluster; every
  listed node seeds the discovery of the others;
- ``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB][?options]``: the master
  that the Sentinels name MASTER_NAME, followed across fail-overs. USER and PASSWORD are the
  master's; the Sentinels' own are the options ``sentinel_username`` and ``sentinel_password``;
  ``ssl=true`` for TLS.

A client of a cluster is a ``RedisCluster``: it answers every command Runbell sends (each one
single-slot by the key layout of runbell.bus.keys), so the callers type it as a ``Redis``.
Hook side (redis only): the gateway and the CLI use it too.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.sentinel

from runbell.bus import keys

ACCEPTED = [
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]",
    "rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB]",
    "unix://[[USER]:PASSWORD@]/PATH[?db=DB]",
    "redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...][/][?ssl=true]",
    "redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB][?sentinel_username=U&sentinel_password=P&ssl=true]",
]
PLAIN_SCHEMES = ("redis", "rediss", "unix")
OPTIONS = {"redis+cluster": {"ssl"}, "redis+sentinel": {"ssl", "sentinel_username", "sentinel_password"}}


class BadRedisUrl(ValueError):
    """RUNBELL_REDIS_URL is not one of the accepted shapes (the message never holds a password)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"RUNBELL_REDIS_URL {redacted(url)!r}: {reason}; accepted: {', '.join(ACCEPTED)}")


@dataclass(frozen=True)
class RedisTarget:
    """What a URL names: one node (``url``), a cluster (``nodes``) or a Sentinel group (``nodes`` + ``master``)."""

    kind: str  # "node", "cluster" or "sentinel"
    url: str = ""  # the node's URL, as redis-py reads it
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def redacted(url: str) -> str:
    """The URL with whatever stands between '//' and '@' (user and password) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else url
    userinfo, at, host = rest.rpartition("@")
    return without_password_options(f"{scheme}://***@{host}" if at else url)


def without_password_options(url: str) -> str:
    """The URL with the value of every ``…password=`` option replaced by *** (a Sentinel's)."""
    return re.sub(r"(password=)[^&#]*", r"\1***", url)


def parse(url: str) -> RedisTarget:
    """RUNBELL_REDIS_URL read, or BadRedisUrl."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in PLAIN_SCHEMES:
        try:
            redis.connection.parse_url(url)  # type: ignore[no-untyped-call, unused-ignore]  # redis-py's own check, so a bad URL fails here, not at the first command
        except ValueError as exc:
            raise BadRedisUrl(url, str(exc).replace(url, redacted(url))) from None
        return RedisTarget("node", url=url)
    if scheme not in OPTIONS:
        raise BadRedisUrl(url, f"unknown scheme {scheme!r}" if scheme else "no scheme")
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError as exc:
        raise BadRedisUrl(url, str(exc)) from None
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    nodes = tuple(_host_port(url, item) for item in hosts.split(","))
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - OPTIONS[scheme])
    if unknown:
        raise BadRedisUrl(url, f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(OPTIONS[scheme]))})")
    ssl = _flag(url, options.get("ssl", "false"))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if scheme == "redis+cluster":
        if path:
            raise BadRedisUrl(url, "a cluster URL has no path (a cluster has database 0 only)")
        return RedisTarget("cluster", nodes=nodes, username=username, password=password, ssl=ssl)
    if not path or len(path) > 2:
        raise BadRedisUrl(url, "a Sentinel URL names the master: /MASTER_NAME[/DB]")
    db = path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise BadRedisUrl(url, f"the database must be a number, not {db!r}")
    return RedisTarget(
        "sentinel",
        nodes=nodes,
        master=path[0],
        db=int(db),
        username=username,
        password=password,
        ssl=ssl,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )


def _host_port(url: str, item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRedisUrl(url, f"every node must be HOST:PORT, not {item!r}")
    return host, int(port)


def _flag(url: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no", ""):
        return False
    raise BadRedisUrl(url, f"ssl must be true or false, not {value!r}")


def _auth(target: RedisTarget) -> dict[str, Any]:
    found: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.ssl:
        found["ssl"] = True
    return found


def _sentinel_kwargs(target: RedisTarget, options: dict[str, Any]) -> dict[str, Any]:
    timeouts = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    found = {**timeouts, "username": target.sentinel_username, "password": target.sentinel_password}
    if target.ssl:
        found["ssl"] = True
    return found


def sync_client(url: str, **options: Any) -> redis.Redis:
    """A client of the URL's Redis (node, cluster or Sentinel master); ``options`` go to its connections."""
    target = parse(url)
    if target.kind == "node":
        return redis.Redis.from_url(url, **options)
    if target.kind == "cluster":
        options.pop("health_check_interval", None)
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.nodes]  # type: ignore[no-untyped-call, unused-ignore]
        return cast(redis.Redis, redis.cluster.RedisCluster(startup_nodes=nodes, **_auth(target), **options))
    sentinel = redis.sentinel.Sentinel(list(target.nodes), sentinel_kwargs=_sentinel_kwargs(target, options))  # type: ignore[no-untyped-call, unused-ignore]
    return cast(redis.Redis, sentinel.master_for(target.master, db=target.db, **_auth(target), **options))  # type: ignore[no-untyped-call, unused-ignore]


def async_client(url: str, *, max_connections: int | None = None, **options: Any) -> aioredis.Redis:
    """An asyncio client of the URL's Redis. With ``max_connections``, commands queue for a
    connection (up to 5 s) instead of opening more: a crowd of waiters does not grow them."""
    target = parse(url)
    if target.kind == "node":
        if max_connections is None:
            return aioredis.Redis.from_url(url, **options)
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5, **options)
        return aioredis.Redis.from_pool(pool)
    limit: dict[str, Any] = {} if max_connections is None else {"max_connections": max_connections}
    if target.kind == "cluster":
        nodes = [aiocluster.ClusterNode(host, port) for host, port in target.nodes]
        return cast(aioredis.Redis, aiocluster.RedisCluster(startup_nodes=nodes, **_auth(target), **limit, **options))
    sentinel = aiosentinel.Sentinel(list(target.nodes), sentinel_kwargs=_sentinel_kwargs(target, options))  # type: ignore[no-untyped-call, unused-ignore]  # redis-py leaves it unannotated
    return cast(aioredis.Redis, sentinel.master_for(target.master, db=target.db, **_auth(target), **limit, **options))


def is_cluster(client: object) -> bool:
    return isinstance(client, (aiocluster.RedisCluster, redis.cluster.RedisCluster))


def check(url: str) -> None:
    """Raise BadRedisUrl now when the URL is not an accepted shape (settings, the CLI)."""
    parse(url)


def agreed_partitions(stored: object, configured: int, logger: logging.Logger) -> int:
    """The namespace's partition count, given the reply of ``SET partitions_key configured NX GET``:
    the stored one wins (every hook and gateway of a namespace must use one count); a configured
    count that disagrees is logged as an error, not fatal (a hook must not stop Airflow)."""
    if stored is None:
        return configured
    try:
        count = keys.partitions(int(stored))  # type: ignore[call-overload]  # bytes or str, else TypeError
    except (TypeError, ValueError):
        logger.error("runbell: the stored stream partition count %r is not one; using the configured %d", stored, configured)
        return configured
    if count != configured:
        logger.error(
            "runbell: RUNBELL_STREAM_PARTITIONS is %d but this namespace's Redis holds %d (set first, by whichever "
            "hook or gateway started first): using %d. Set the same value everywhere (or delete the key %s to change it).",
            configured,
            count,
            count,
            "<namespace>:meta:partitions",
        )
    return count


_REDIS_PACKAGE = os.path.dirname(redis.__file__) + os.sep


def raised_inside_redis(exc: BaseException) -> bool:
    """Whether an AttributeError or TypeError was raised by redis-py's own code. Its cluster client
    can fail so while the topology changes (a connection torn down under a pipeline when a master
    dies; redis/redis-py#3835 is one of the kind): an outage to retry, not a bug of ours to surface."""
    if not isinstance(exc, (AttributeError, TypeError)) or exc.__traceback__ is None:
        return False
    frame = exc.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return frame.tb_frame.f_code.co_filename.startswith(_REDIS_PACKAGE)
