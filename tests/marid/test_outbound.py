"""The outbound policy (marid/outbound.py, docs/security.md §3) as pure functions, and its
resolver on this machine's own names (no network: `localhost` is answered locally)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from marid import config as config_module
from marid import outbound
from marid.outbound import Policy, Refused, classify, parse_host

# Spellings the C library reads as an IPv4 address (compared with inet_aton below).
NUMERIC = [
    "127.0.0.1", "127.1", "127.0.1", "0x7f000001", "0X7F000001", "2130706433", "017700000001",
    "0177.0.0.1", "0x7f.1", "0x7f.0x0.0.1", "0000000000000177.1", "1.2.3.0377", "01.02.03.04",
    "4294967295", "0xffffffff", "0", "00", "10.1", "169.254.43518",
]  # fmt: skip
# What inet_aton refuses: names, then.
NOT_NUMERIC = [
    "", "0x", "08", "09.1", "0xg", "256.1", "1.256.1", "1.2.65536", "1.16777216", "4294967296",
    "0x100000000", "1.2.3.4.5", "1..2", "1.2.3.0x100", "1.2.3.0400", "+1", "1_0", "-1", "1e3",
    "abc", "example.com", "0xFFFFFF.1", "\u0661\u0662\u0667.0.0.1",
]  # fmt: skip


@pytest.mark.parametrize("host", NUMERIC)
def test_numeric_hosts_are_read_as_inet_aton_reads_them(host: str):
    assert parse_host(host) == ipaddress.IPv4Address(socket.inet_aton(host))


@pytest.mark.parametrize("host", NOT_NUMERIC)
def test_what_inet_aton_refuses_is_a_name(host: str):
    with pytest.raises(OSError):
        socket.inet_aton(host)
    assert parse_host(host) is None


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1.", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%25eth0]", "fe80::1"),
    ],
)
def test_ipv6_and_trailing_dots(host: str, address: str):
    assert parse_host(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("100.127.255.255", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00::1", "unique-local"),
        ("fc00::1", "unique-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("2001:db8::1", "reserved"),
        ("2001::1", "reserved"),  # Teredo
        ("::127.0.0.1", "reserved"),  # IPv4-compatible, long deprecated
        ("fec0::1", "reserved"),  # site-local, deprecated
        # IPv4 carried in IPv6 is judged as that IPv4 address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", "link-local"),
        # Public.
        ("8.8.8.8", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("192.169.0.1", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        ("2002:808:808::1", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_classify(address: str, reason: str | None):
    assert classify(ipaddress.ip_address(address)) == reason


def test_allow_lists_addresses_networks_and_names():
    policy = Policy(["10.1.2.0/24", "192.168.7.9", "0xa9fea9fe", "git.internal.", "fd00::/8"])
    assert policy.refusal(ipaddress.ip_address("10.1.2.3")) is None
    assert policy.refusal(ipaddress.ip_address("10.1.3.1")) == "private"
    assert policy.refusal(ipaddress.ip_address("192.168.7.9")) is None
    assert policy.refusal(ipaddress.ip_address("192.168.7.10")) == "private"
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) is None  # spelled in hex
    assert policy.refusal(ipaddress.ip_address("::ffff:10.1.2.3")) is None  # mapped
    assert policy.refusal(ipaddress.ip_address("fd12::1")) is None
    assert policy.refusal(ipaddress.ip_address("8.8.8.8")) is None  # public anyway
    assert policy.allows_name("GIT.internal") and policy.allows_name("git.internal.")
    assert not policy.allows_name("internal") and not policy.allows_name("x.git.internal")


def test_allow_loopback_is_folded_into_the_allow_list():
    settings = config_module.from_dict(
        {
            "database": {"dsn": "postgresql:///x"},
            "crypto": {"key": "k" * 32},
            "webhooks": {"allow_loopback": True},
            "outbound": {"allow": ["10.0.0.0/8"]},
        },
        optional=("server.url", "storage.path"),
    )
    policy = Policy.from_config(settings)
    for address in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1", "10.0.0.1"):
        assert policy.refusal(ipaddress.ip_address(address)) is None, address
    assert policy.refusal(ipaddress.ip_address("192.168.0.1")) == "private"
    assert policy.allows_name("localhost")
    assert Policy(allow_loopback=False).refusal(ipaddress.ip_address("127.0.0.1")) == "loopback"


@pytest.mark.parametrize(
    ("host", "error"),
    [
        ("127.1", "127.0.0.1 is refused by policy (loopback); see outbound.allow"),
        ("0x7f000001", "127.0.0.1 is refused by policy (loopback); see outbound.allow"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1 is refused by policy (loopback); see outbound.allow"),
        ("localhost", "localhost is refused by policy (loopback); see outbound.allow"),
        ("a.localhost.", "a.localhost. is refused by policy (loopback); see outbound.allow"),
        ("10.1", "10.0.0.1 is refused by policy (private); see outbound.allow"),
        ("169.254.169.254", "169.254.169.254 is refused by policy (link-local); see outbound.allow"),  # noqa: E501
    ],
)  # fmt: skip
def test_check_host_refuses_literals_and_localhost(host: str, error: str):
    with pytest.raises(Refused) as refused:
        Policy().check_host(host)
    assert str(refused.value) == error


def test_check_host_writes_allowed_literals_canonically_and_leaves_names():
    policy = Policy(["127.0.0.0/8", "::1"])
    assert policy.check_host("2130706433") == "127.0.0.1"
    assert policy.check_host("::ffff:127.0.0.1") == "::ffff:7f00:1"
    assert policy.check_host("localhost") == "localhost"
    assert Policy().check_host("8.8.8.8") == "8.8.8.8"
    assert Policy().check_host("internal.example") == "internal.example"  # checked when resolved


def test_checked_url_keeps_everything_but_the_host_spelling():
    policy = Policy(["127.0.0.0/8"])
    assert (
        policy.checked_url("http://u:p@0x7f000001:8080/a/b?c=d#e")
        == "http://u:p@127.0.0.1:8080/a/b?c=d#e"
    )
    assert policy.checked_url("https://017700000001/x") == "https://127.0.0.1/x"
    assert policy.checked_url("http://[::ffff:127.0.0.1]:1/x") == "http://[::ffff:7f00:1]:1/x"
    assert policy.checked_url("https://Example.COM/x") == "https://Example.COM/x"
    with pytest.raises(Refused):
        Policy().checked_url("http://user@127.1:80/")
    with pytest.raises(ValueError):
        Policy().checked_url("http:///x")


# The resolver: a name's answers are checked one by one (no network: `localhost` is answered
# from this machine's hosts file).


async def test_the_resolver_refuses_a_name_whose_addresses_are_refused():
    resolver = outbound.Resolver(Policy())
    with pytest.raises(Refused) as refused:
        await resolver.resolve("localhost", 80)
    assert str(refused.value) == "localhost is refused by policy (loopback); see outbound.allow"
    with pytest.raises(Refused):  # a numeric spelling is not looked up: it is the address
        await resolver.resolve("0x7f000001", 80)


async def test_the_resolver_returns_only_allowed_addresses():
    resolver = outbound.Resolver(Policy(["127.0.0.0/8"]))
    found = await resolver.resolve("localhost", 8080, socket.AF_INET)
    assert found and all(r["host"] == "127.0.0.1" for r in found)
    assert found[0] == {
        "hostname": "localhost",
        "host": "127.0.0.1",
        "port": 8080,
        "family": socket.AF_INET,
        "proto": 0,
        "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
    }
    assert [r["host"] for r in await resolver.resolve("2130706433", 1)] == ["127.0.0.1"]


async def test_an_allowed_name_is_connected_to_whatever_it_resolves_to():
    policy = Policy(["localhost"])
    assert "127.0.0.1" in await policy.addresses("localhost", 80)
    with pytest.raises(Refused):  # the name, not the address, is allowed
        await policy.addresses("127.0.0.1", 80)
