"""The Redis test services themselves: TLS, unix socket, ACL users, the Cluster and Sentinel
set-ups, and their fault helpers (a migration, a failover, a lagging replica really lose or
keep what they should)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests._services import RedisClusterService, RedisSentinelService
from tests.conftest import AclUser, TlsRedis

NO_RETRY = Retry(NoBackoff(), 0)


def test_redis_unix_url_answers_ping(redis_unix_url: str) -> None:
    assert redis_unix_url.startswith("unix:///")
    with contextlib.closing(redis.Redis.from_url(redis_unix_url)) as client:
        assert client.ping() is True
        assert client.client_info()["addr"].startswith("/")  # not a TCP peer


def test_redis_tls_checks_the_server_certificate_against_the_test_ca(redis_tls: TlsRedis) -> None:
    with contextlib.closing(redis.Redis.from_url(redis_tls.url)) as client:
        assert client.ping() is True
    mutual = redis.Redis.from_url(
        redis_tls.url,
        ssl_certfile=str(redis_tls.files.client_cert),
        ssl_keyfile=str(redis_tls.files.client_key),
    )
    with contextlib.closing(mutual):
        assert mutual.ping() is True
    # Without the CA the certificate is unknown: the handshake fails.
    untrusted = redis.Redis(host="127.0.0.1", port=redis_tls.server.port, ssl=True, retry=NO_RETRY)
    with contextlib.closing(untrusted), pytest.raises(redis.exceptions.ConnectionError) as caught:
        untrusted.ping()
    assert "certificate verify failed" in str(caught.value)
    plain = redis.Redis(
        host="127.0.0.1", port=redis_tls.server.port, socket_timeout=1, retry=NO_RETRY
    )
    with contextlib.closing(plain), pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()  # the port speaks TLS only


def test_redis_acl_user_logs_in_with_its_rules(
    redis_acl_user: Callable[..., AclUser],
) -> None:
    user = redis_acl_user("~app:*", "+@all")
    with contextlib.closing(redis.Redis.from_url(user.url)) as client:
        assert client.acl_whoami() == user.username
        client.set("app:key", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("other:key", "1")
    wrong = redis.Redis.from_url(user.url.replace(user.password, "wrong"))
    with contextlib.closing(wrong), pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()


def _cluster_client(cluster: RedisClusterService) -> redis.RedisCluster:
    return redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)


def test_redis_cluster_has_three_masters_with_a_replica_each(
    redis_cluster: RedisClusterService,
) -> None:
    assert redis_cluster.url == (
        f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]},127.0.0.1:{redis_cluster.ports[1]}"
    )
    masters = redis_cluster.master_ports()
    assert len(masters) == 3
    replicas = {redis_cluster.replica_of(port) for port in masters}
    assert len(replicas) == 3
    assert sorted([*masters, *replicas]) == sorted(redis_cluster.ports)
    for port in redis_cluster.ports:
        with contextlib.closing(redis_cluster.node(port).client()) as client:
            info = str(client.execute_command("CLUSTER", "INFO"))
        assert "cluster_state:ok" in info
        assert "cluster_slots_ok:16384" in info
    with contextlib.closing(_cluster_client(redis_cluster)) as client:
        for i in range(30):  # keys in every master's slots
            client.set(f"key{i}", i)
        assert [client.get(f"key{i}") for i in range(30)] == [str(i) for i in range(30)]
        assert {redis_cluster.owner(redis_cluster.slot_of(f"key{i}")) for i in range(30)} == set(
            masters
        )


def test_redis_cluster_is_flushed_between_tests(redis_cluster: RedisClusterService) -> None:
    with contextlib.closing(_cluster_client(redis_cluster)) as client:
        assert client.dbsize() == 0  # test_..._three_masters wrote 30 keys


def test_redis_cluster_slot_migration_moves_the_keys_and_asks_meanwhile(
    redis_cluster: RedisClusterService,
) -> None:
    slot = redis_cluster.slot_of("{stream}")
    source = redis_cluster.owner(slot)
    target = next(port for port in redis_cluster.master_ports() if port != source)
    with contextlib.closing(redis_cluster.node(source).client()) as client:
        client.set("{stream}:moved", "a")
        client.set("{stream}:kept", "b")
    migration = redis_cluster.migrating_slot(slot, target)
    with contextlib.closing(redis_cluster.node(source).client()) as client:
        client.execute_command(
            "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", "{stream}:moved"
        )
        assert client.get("{stream}:kept") == "b"  # still here
        with pytest.raises(redis.exceptions.AskError):
            client.get("{stream}:moved")
    with contextlib.closing(_cluster_client(redis_cluster)) as client:
        assert client.get("{stream}:moved") == "a"  # redis-py follows the ASK
    migration.finish()
    assert redis_cluster.owner(slot) == target
    with contextlib.closing(redis_cluster.node(target).client()) as client:
        assert client.mget("{stream}:moved", "{stream}:kept") == ["a", "b"]


def test_redis_cluster_failover_promotes_the_replica_with_the_data(
    redis_cluster: RedisClusterService,
) -> None:
    slot = redis_cluster.slot_of("{f}")
    master = redis_cluster.owner(slot)
    with contextlib.closing(redis_cluster.node(master).client()) as client:
        client.set("{f}", "kept")
        assert client.execute_command("WAIT", 1, 5000) == 1
    promoted = redis_cluster.failover(master)
    assert redis_cluster.owner(slot) == promoted != master
    assert redis_cluster.replica_of(promoted) == master  # the old master follows it
    with contextlib.closing(redis_cluster.node(promoted).client()) as client:
        assert client.get("{f}") == "kept"


def test_redis_cluster_replaces_a_killed_master(redis_cluster: RedisClusterService) -> None:
    slot = redis_cluster.slot_of("{k}")
    master = redis_cluster.owner(slot)
    replica = redis_cluster.replica_of(master)
    with contextlib.closing(redis_cluster.node(master).client()) as client:
        client.set("{k}", "kept")
        assert client.execute_command("WAIT", 1, 5000) == 1
    redis_cluster.kill(master)
    redis_cluster.wait_healthy(replicas=False)
    assert redis_cluster.owner(slot) == replica
    with contextlib.closing(_cluster_client(redis_cluster)) as client:
        assert client.get("{k}") == "kept"
    redis_cluster.heal()  # what the next test's fixture does
    assert redis_cluster.replica_of(replica) == master


def test_redis_sentinel_set_up_is_healthy(redis_sentinel: RedisSentinelService) -> None:
    hosts = ",".join(f"127.0.0.1:{port}" for _, port in redis_sentinel.sentinel_addresses)
    assert redis_sentinel.url == f"redis+sentinel://{hosts}/{redis_sentinel.service}/0"
    sentinel = redis.Sentinel(redis_sentinel.sentinel_addresses, socket_timeout=2)
    assert sentinel.discover_master(redis_sentinel.service) == (
        "127.0.0.1",
        redis_sentinel.master_port(),
    )
    master = sentinel.master_for(redis_sentinel.service, decode_responses=True)
    with contextlib.closing(master):
        assert master.dbsize() == 0
        master.set("k", "v")
        assert master.execute_command("WAIT", 1, 5000) == 1
    with contextlib.closing(redis_sentinel.replica().client()) as client:
        assert client.get("k") == "v"


def test_redis_sentinel_failover_moves_the_master(redis_sentinel: RedisSentinelService) -> None:
    old = redis_sentinel.master_port()
    with contextlib.closing(redis_sentinel.master().client()) as client:
        client.set("k", "v")
        assert client.execute_command("WAIT", 1, 5000) == 1
    new = redis_sentinel.failover()
    assert new != old
    assert redis_sentinel.master_port() == new
    assert redis_sentinel.replica().port == old
    with contextlib.closing(redis_sentinel.master().client()) as client:
        assert client.get("k") == "v"
        assert client.info("replication")["role"] == "master"


def test_redis_sentinel_promotes_the_replica_of_a_killed_master(
    redis_sentinel: RedisSentinelService,
) -> None:
    old = redis_sentinel.kill_master()
    new = redis_sentinel.wait_for_failover(old)
    assert new != old
    assert not redis_sentinel.server(old).running
    redis_sentinel.heal()  # what the next test's fixture does
    assert redis_sentinel.replica().port == old


def test_a_failover_to_a_lagging_replica_loses_the_writes_made_while_it_lagged(
    redis_sentinel: RedisSentinelService,
) -> None:
    old = redis_sentinel.master_port()
    with contextlib.closing(redis_sentinel.master().client()) as client:
        client.set("replicated", "1")
        assert client.execute_command("WAIT", 1, 5000) == 1
        redis_sentinel.pause_replication()
        client.set("lost", "1")
        assert client.execute_command("WAIT", 1, 200) == 0  # nobody acknowledged it
        assert client.get("lost") == "1"
    new = redis_sentinel.fail_over_to_lagging_replica()
    assert new != old
    with contextlib.closing(redis_sentinel.master().client()) as client:
        assert client.get("replicated") == "1"
        assert client.get("lost") is None
