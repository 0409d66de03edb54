"""Where webhooks may be sent: never into the gateway's own network unless an operator says so.

A target URL is refused when its host resolves to any address that is not publicly routable
(loopback, private, link-local — cloud metadata lives there —, multicast, reserved, unspecified,
shared address space; IPv6 alike, and IPv4 addresses wrapped in IPv6 are judged as the IPv4 they
carry), unless the allow-list (RUNBELL_WEBHOOK_ALLOWED_HOSTS: host names or CIDRs) permits the
host or the address.

The check runs twice: when an endpoint is saved (check_url, to answer the caller with the reason)
and when a delivery connects (guarded_transport). The transport resolves the name itself, checks
every address, and connects to an address it checked, so a name that resolves to a public address
when saved and to 127.0.0.1 at delivery time (DNS rebinding) is still refused. TLS still verifies
the certificate against the name, and the Host header still carries it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

import anyio
import httpcore
import httpx

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

SCHEMES = ("http", "https")
ALLOW_SETTING = "RUNBELL_WEBHOOK_ALLOWED_HOSTS"
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # DNS64 wraps every IPv4 host in it: judge the IPv4
HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


class TargetRefused(Exception):
    """The URL may not be a webhook target; `reason` says why, for the caller."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RefusedAtConnect(TargetRefused, httpcore.ConnectError):
    """Raised inside the transport: httpx turns it into httpx.ConnectError (a failed attempt like
    any unreachable receiver) with the same message, and keeps this as its __cause__."""


@dataclass
class TargetPolicy:
    """The allow-list: host names (exact, case-insensitive) and CIDRs (a bare address is a /32 or /128)."""

    allowed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._hosts: set[str] = set()
        self._networks: list[IPNetwork] = []
        for entry in self.allowed:
            network = _as_network(entry)
            if network is not None:
                self._networks.append(network)
            else:
                self._hosts.add(_normal_host(entry))

    @classmethod
    def from_setting(cls, raw: str | None) -> TargetPolicy:
        """'hooks.internal, 10.0.0.0/8, 127.0.0.1' -> a policy; ValueError names a bad entry."""
        entries = [entry.strip() for entry in (raw or "").split(",") if entry.strip()]
        for index, entry in enumerate(entries):
            if _as_network(entry) is None and not HOST_NAME.match(_normal_host(entry)):
                raise ValueError(f"{ALLOW_SETTING} entry #{index + 1} ({entry!r}) is neither a host name nor a CIDR")
        return cls(entries)

    def allows_host(self, host: str) -> bool:
        return _normal_host(host) in self._hosts

    def allows_address(self, address: IPAddress) -> bool:
        inner = _embedded_ipv4(address)
        candidates = [address] if inner is None else [address, inner]
        return any(candidate in network for candidate in candidates for network in self._networks if candidate.version == network.version)


def forbidden_reason(address: IPAddress) -> str | None:
    """Why the address may not be a target by default, or None when it is publicly routable."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        reason = forbidden_reason(inner)
        if reason is not None:
            return f"{reason} IPv4 {inner} wrapped in IPv6"
        if address.ipv4_mapped is not None or address in NAT64:  # type: ignore[union-attr]
            return None  # nothing but the public IPv4 it carries
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("site-local", getattr(address, "is_site_local", False)),
        ("not publicly routable", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def parse_target(url: str) -> httpx.URL:
    """The URL as httpx will send to it; TargetRefused for a scheme, userinfo or host it must not have."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise TargetRefused(f"not a valid URL: {exc}") from None
    if parsed.scheme not in SCHEMES:
        raise TargetRefused(f"the scheme must be http or https, not {parsed.scheme or 'none'!r}")
    if parsed.userinfo:
        raise TargetRefused("credentials in the URL (user:password@) are not accepted")
    if not parsed.host:
        raise TargetRefused("the URL has no host")
    host = _connect_host(parsed)
    if _as_address(host) is None and not HOST_NAME.match(host.removesuffix(".")):
        raise TargetRefused(f"not a valid host name: {host!r}")
    return parsed


async def resolve(host: str, port: int) -> list[str]:
    """Every address the host resolves to (an IP literal resolves to itself); OSError if none."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    return addresses


def refusal(policy: TargetPolicy, host: str, addresses: Iterable[str]) -> str | None:
    """Why connecting to the host at these addresses is refused, or None when every one is fine."""
    if policy.allows_host(host):
        return None
    for raw in addresses:
        address = _as_address(raw)
        if address is None:
            return f"{host} resolves to {raw!r}, which is not an IP address"
        reason = forbidden_reason(address)
        if reason is not None and not policy.allows_address(address):
            return f"{host} resolves to {address} ({reason}); allow it with {ALLOW_SETTING} (the host name or a CIDR) if it is meant"
    return None


async def check_url(policy: TargetPolicy, url: str) -> None:
    """Refuse (TargetRefused) a URL that may not be a webhook target."""
    parsed = parse_target(url)
    host = _connect_host(parsed)
    if policy.allows_host(host):
        return
    try:
        addresses = await resolve(host, parsed.port or default_port(parsed.scheme))
    except OSError as exc:
        raise TargetRefused(f"the host {host} does not resolve ({exc})") from None
    reason = refusal(policy, host, addresses)
    if reason is not None:
        raise TargetRefused(reason)


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


# -- at connect time --------------------------------------------------------------------------------


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the policy applied: resolve, check every address, then connect
    to one of exactly those addresses (never resolving the name a second time)."""

    def __init__(self, policy: TargetPolicy, inner: httpcore.AsyncNetworkBackend | None = None):
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options=None
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        reason = refusal(self.policy, host, addresses)
        if reason is not None:
            raise RefusedAtConnect(f"target refused: {reason}")
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise RefusedAtConnect("target refused: webhooks are not delivered over Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over GuardedBackend. No proxy and no Unix socket: both would connect
    somewhere other than the address checked."""

    def __init__(self, policy: TargetPolicy, **transport_kwargs):
        for forbidden in ("proxy", "uds"):
            if transport_kwargs.get(forbidden) is not None:
                raise ValueError(f"a guarded transport cannot use {forbidden}=: it would connect past the check")
        super().__init__(**transport_kwargs)
        pool = self._pool
        if not isinstance(pool, httpcore.AsyncConnectionPool):  # pragma: no cover - only with a proxy
            raise TypeError("a guarded transport needs httpcore's connection pool")
        pool._network_backend = GuardedBackend(policy, pool._network_backend)  # used by every new connection


def guarded_transport(policy: TargetPolicy, **transport_kwargs) -> httpx.AsyncHTTPTransport:
    """An httpx transport that checks every connection's addresses against the policy."""
    return GuardedTransport(policy, **transport_kwargs)


# -- helpers ----------------------------------------------------------------------------------------


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries: mapped (::ffff:a.b.c.d), NAT64 or 6to4."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:  # type: ignore[union-attr]
        return address.ipv4_mapped  # type: ignore[union-attr]
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour  # type: ignore[union-attr]


def _as_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 scope id is not part of the address
    except ValueError:
        return None


def _as_network(entry: str) -> IPNetwork | None:
    text = entry.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        if "/" in text:
            raise ValueError(f"{ALLOW_SETTING}: {entry!r} is not a valid CIDR") from None
        return None


def _normal_host(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _connect_host(parsed: httpx.URL) -> str:
    """The host as httpcore hands it to the network backend (IDNA-encoded, no brackets)."""
    return parsed.raw_host.decode("ascii")
