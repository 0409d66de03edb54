"""The webhook target guard: which addresses are refused, the allow-list, and the check at connect time."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest

from runbell.service.webhooks import target_guard
from runbell.service.webhooks.target_guard import (
    TargetPolicy,
    TargetRefused,
    check_url,
    forbidden_reason,
    guarded_transport,
)

PUBLIC_V4, PUBLIC_V6 = "93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
NO_POLICY = TargetPolicy.from_setting(None)


@pytest.fixture
def dns(monkeypatch):
    """A resolver of the test's own: host -> addresses (a list, or a list of lists answered in turn)."""
    answers: dict[str, list] = {}
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        if host not in answers:
            raise OSError(f"[test resolver] {host} is unknown")
        answer = answers[host]
        if answer and isinstance(answer[0], list):
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return answer

    monkeypatch.setattr(target_guard, "resolve", resolve)
    answers["calls"] = calls  # type: ignore[assignment]
    return answers


# -- what is refused --------------------------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("100.64.0.1", "not publicly routable"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("ff02::1", "multicast"),
    ("fec0::1", "site-local"),
    ("2001:db8::1", "private"),
    ("::ffff:127.0.0.1", "loopback IPv4 127.0.0.1 wrapped in IPv6"),
    ("::ffff:10.0.0.1", "private IPv4 10.0.0.1 wrapped in IPv6"),
    ("::ffff:169.254.169.254", "link-local IPv4 169.254.169.254 wrapped in IPv6"),
    ("64:ff9b::7f00:1", "loopback IPv4 127.0.0.1 wrapped in IPv6"),
    ("2002:7f00:1::", "loopback IPv4 127.0.0.1 wrapped in IPv6"),
]


@pytest.mark.parametrize("address, reason", REFUSED)
def test_each_class_of_address_is_refused(address, reason):
    assert forbidden_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", [PUBLIC_V4, "8.8.8.8", PUBLIC_V6, "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert forbidden_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address, reason", REFUSED)
async def test_a_literal_address_in_the_url_is_refused(address, reason):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(TargetRefused) as refused:
        await check_url(NO_POLICY, f"https://{host}:8443/hook")
    assert f"({reason})" in refused.value.reason
    assert "RUNBELL_WEBHOOK_ALLOWED_HOSTS" in refused.value.reason


async def test_a_host_is_refused_if_any_of_its_addresses_is(dns):
    dns["mixed.example"] = [PUBLIC_V4, PUBLIC_V6, "10.0.0.7"]
    with pytest.raises(TargetRefused, match=r"mixed.example resolves to 10.0.0.7 \(private\)"):
        await check_url(NO_POLICY, "https://mixed.example/hook")
    dns["public.example"] = [PUBLIC_V4, PUBLIC_V6]
    await check_url(NO_POLICY, "https://public.example/hook")


async def test_localhost_is_refused_by_the_real_resolver_unless_allowed():
    with pytest.raises(TargetRefused, match=r"localhost resolves to .* \(loopback\)"):
        await check_url(NO_POLICY, "http://localhost:9000/hook")
    await check_url(TargetPolicy.from_setting("localhost"), "http://localhost:9000/hook")
    await check_url(TargetPolicy.from_setting("127.0.0.0/8, ::1"), "http://localhost:9000/hook")


async def test_a_host_that_does_not_resolve_is_refused(dns):
    with pytest.raises(TargetRefused, match="does not resolve"):
        await check_url(NO_POLICY, "https://nowhere.example/hook")


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://example.com/hook", "scheme must be http or https"),
        ("file:///etc/passwd", "scheme must be http or https"),
        ("gopher://example.com/", "scheme must be http or https"),
        ("example.com/hook", "scheme must be http or https"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://user@example.com/hook", "credentials"),
        ("https:///hook", "no host"),
        ("http://exa mple.com/", "not a valid host name"),
    ],
)
async def test_bad_schemes_userinfo_and_malformed_urls(url, reason):
    with pytest.raises(TargetRefused, match=reason):
        await check_url(NO_POLICY, url)


# -- the allow-list ---------------------------------------------------------------------------------


async def test_allow_by_host_name(dns):
    dns["hooks.internal"] = ["10.9.8.7"]
    policy = TargetPolicy.from_setting(" Hooks.Internal. ,other.internal")
    await check_url(policy, "https://hooks.internal/x")
    await check_url(policy, "https://HOOKS.internal./x")
    dns["sneaky.internal"] = ["10.9.8.7"]
    with pytest.raises(TargetRefused):
        await check_url(policy, "https://sneaky.internal/x")  # the address alone is not allowed


async def test_allow_by_cidr_covers_exactly_that_range(dns):
    policy = TargetPolicy.from_setting("10.0.0.0/8,fd00::/8,192.168.1.5")
    dns["a.internal"] = ["10.200.0.1", "fd00::5"]
    await check_url(policy, "https://a.internal/x")
    await check_url(policy, "http://192.168.1.5/x")
    await check_url(policy, "http://[::ffff:10.1.1.1]/x")  # the IPv4 it carries is in the range
    dns["b.internal"] = ["10.200.0.1", "172.16.0.1"]
    with pytest.raises(TargetRefused, match="172.16.0.1"):
        await check_url(policy, "https://b.internal/x")
    with pytest.raises(TargetRefused):
        await check_url(policy, "http://192.168.1.6/x")


@pytest.mark.parametrize("raw", ["10.0.0.0/33", "not a host", "*.example.com", "a/b"])
def test_a_bad_allow_list_entry_is_named(raw):
    with pytest.raises(ValueError, match="RUNBELL_WEBHOOK_ALLOWED_HOSTS"):
        TargetPolicy.from_setting(f"ok.example,{raw}")


def test_an_empty_setting_allows_nothing():
    for raw in (None, "", " , "):
        assert TargetPolicy.from_setting(raw).allowed == []


# -- at connect time ----------------------------------------------------------------------------------


class Receiver:
    """A bare HTTP server on loopback that records each request's head and answers 204."""

    def __init__(self):
        self.heads: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head.decode())
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_dns_rebinding_between_the_check_and_the_connection_is_refused(dns):
    dns["rebind.example"] = [[PUBLIC_V4], ["127.0.0.1"]]  # public when saved, loopback when delivering
    async with Receiver() as port:
        url = f"http://rebind.example:{port}/hook"
        await check_url(NO_POLICY, url)
        async with httpx.AsyncClient(transport=guarded_transport(NO_POLICY)) as client:
            with pytest.raises(httpx.ConnectError, match=r"target refused: rebind.example resolves to 127.0.0.1") as err:
                await client.post(url, content=b"{}")
    assert isinstance(err.value.__cause__, TargetRefused)


async def test_the_transport_connects_to_the_address_it_checked_and_keeps_the_name(dns):
    # The system resolver does not know this name: reaching the receiver proves the transport
    # connected to the address its own resolution checked, not to a second lookup.
    dns["hooks.test"] = ["127.0.0.1"]
    policy = TargetPolicy.from_setting("127.0.0.1")
    receiver = Receiver()
    async with receiver as port:
        async with httpx.AsyncClient(transport=guarded_transport(policy)) as client:
            response = await client.post(f"http://hooks.test:{port}/hook", content=b"{}")
    assert response.status_code == 204
    assert f"host: hooks.test:{port}" in receiver.heads[0].lower()
    assert dns["calls"].count("hooks.test") == 1


async def test_the_transport_refuses_a_literal_loopback_address():
    async with Receiver() as port:
        async with httpx.AsyncClient(transport=guarded_transport(NO_POLICY)) as client:
            with pytest.raises(httpx.ConnectError, match=r"target refused: 127.0.0.1 resolves to 127.0.0.1 \(loopback\)"):
                await client.get(f"http://127.0.0.1:{port}/")
        async with httpx.AsyncClient(transport=guarded_transport(TargetPolicy.from_setting("localhost"))) as client:
            assert (await client.get(f"http://localhost:{port}/")).status_code == 204


async def test_a_name_that_stops_resolving_is_an_ordinary_connect_error(dns):
    async with httpx.AsyncClient(transport=guarded_transport(NO_POLICY)) as client:
        with pytest.raises(httpx.ConnectError, match="cannot resolve gone.example") as err:
            await client.get("http://gone.example/")
    assert not isinstance(err.value.__cause__, TargetRefused)


@pytest.mark.parametrize("kwargs", [{"proxy": "http://127.0.0.1:3128"}, {"uds": "/tmp/x.sock"}])
def test_no_proxy_or_unix_socket_can_bypass_the_check(kwargs):
    with pytest.raises(ValueError, match="past the check"):
        guarded_transport(NO_POLICY, **kwargs)


def test_the_gateway_refuses_to_start_with_a_bad_allow_list():
    from pydantic import ValidationError

    from runbell.service.settings import load_settings

    assert load_settings(env={"RUNBELL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1, localhost"}).webhook_allowed_hosts
    with pytest.raises(ValidationError, match="10.0.0.0/40"):
        load_settings(env={"RUNBELL_WEBHOOK_ALLOWED_HOSTS": "localhost,10.0.0.0/40"})
