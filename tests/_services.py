"""Real external services for the test suite: redis-server, PostgreSQL, Chromium, uvicorn.

Every helper here starts a real process (or thread) on a free loopback port, waits until it
answers, and stops it again. Readiness is polled with a deadline only while waiting for an
external process to come up; nothing here sleeps to wait for anything else.

Server processes die with the test session even when pytest itself is killed (`dies_with_us`).
A missing service raises `ServiceUnavailable`; `conftest.py` turns that into a skip locally and
a failure under `CI=true` (see `unavailable`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import glob
import http.server
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

import pytest
import uvicorn

if TYPE_CHECKING:
    import redis
    from playwright.async_api import Browser as AsyncBrowser
    from playwright.async_api import Playwright as AsyncPlaywright
    from playwright.sync_api import Browser, Playwright

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PG_DIR_PREFIX = "resumable-stream-pg-"
NO_POSTGRES_USER = (
    "PostgreSQL refuses to run as root and there is no `postgres` user to run it as "
    "(create one: useradd --system --user-group postgres)"
)

# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# machine's closed network refuses; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)


class ServiceUnavailable(Exception):
    """An external program the tests need is missing or would not start."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the test locally; fail it under CI=true, where every service must be present."""
    # `from None`: the ServiceUnavailable being handled is already in `reason`.
    if in_ci():
        message = f"{reason} (CI=true: every test service must be available)"
        raise pytest.fail.Exception(message, pytrace=False) from None
    raise pytest.skip.Exception(reason) from None


def from_package_index(command: list[str], what: str, *, timeout: float = 300) -> None:
    """Run ``command``, which downloads from the package index (pip, ``python -m build``);
    if it fails or hangs, the test is :func:`unavailable` (skipped locally, failed under
    CI), with pip's own words."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        unavailable(f"{what}: no answer within {timeout:g} s (is the package index reachable?)")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        unavailable(f"{what} failed (is the package index reachable?):\n{tail}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def html_page(page: bytes) -> Iterator[str]:
    """A stdlib HTTP server on a free loopback port that answers every GET with ``page``
    (HTML); its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until_ready(
    ready: Callable[[], bool],
    *,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> None:
    """Poll `ready()` until it is true; give up at the deadline or when `process` exits.

    Only for waiting on an external process to come up: it has no event to wait on.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            raise ServiceUnavailable(
                f"{what} exited with code {process.returncode} before it was ready{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"{what} not ready after {timeout:.0f}s{_log_tail(log)}")
        time.sleep(0.05)


def _log_tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(log) + " ---\n" + "\n".join(tail) if tail else ""


_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")


def spawn_for_the_session(command: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen` from one thread that lives as long as the test session.

    setpriv's --pdeathsig (see `dies_with_us`) fires when the *thread* that started the
    process exits, and helpers that restart servers are called from `asyncio.to_thread`
    workers, which end with the test's event loop: a server restarted there died a moment
    after the test.
    """
    return _SPAWNER.submit(subprocess.Popen, command, **options).result()


def dies_with_us(command: Sequence[str], *, as_postgres: bool = False) -> list[str]:
    """`command` wrapped so the kernel sends it SIGTERM when this process dies.

    Server processes are children of the test session; without this, a session killed with
    SIGKILL (or SIGTERM, which skips fixture teardown) would leave them running. `as_postgres`
    also drops from root to the `postgres` user. Uses util-linux's setpriv, where it exists.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if as_postgres:
            raise ServiceUnavailable(
                "running as root needs setpriv (util-linux) to drop to postgres"
            )
        return list(command)
    wrapper = [setpriv, "--pdeathsig=TERM"]
    if as_postgres:
        try:
            gid = pwd.getpwnam("postgres").pw_gid
        except KeyError as exc:
            raise ServiceUnavailable(NO_POSTGRES_USER) from exc
        wrapper += ["--reuid=postgres", f"--regid={gid}", "--init-groups"]
    return [*wrapper, "--", *command]


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


def _stop_process(
    process: subprocess.Popen[bytes],
    *,
    group: bool = False,
    first: signal.Signals = signal.SIGTERM,
) -> None:
    """Send `first` (SIGTERM), then SIGKILL after STOP_TIMEOUT; always reaps the process."""
    if process.poll() is None:
        _signal(process, first, group=group)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal(process, signal.SIGKILL, group=group)
    process.wait()
    if group:
        # Children the process left behind die with their process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def _signal(process: subprocess.Popen[bytes], sig: signal.Signals, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)


# --- redis-server ----------------------------------------------------------------------------


#: How to install each server program the tests start (Debian 12).
_SERVER_PACKAGES = {
    "redis-server": "apt-get install redis-server",
    # Valkey is not in Debian 12 itself; bookworm-backports has valkey-server 8.0 (.ci/run).
    "valkey-server": "apt-get install -t bookworm-backports valkey-server",
}


def _redis_executable(name: str = "redis-server") -> str:
    executable = shutil.which(name)
    if executable is None:
        raise ServiceUnavailable(f"{name} is not installed ({_SERVER_PACKAGES[name]})")
    return executable


@dataclass(frozen=True)
class TlsFiles:
    """A CA made by the test session, and a server and a client certificate it signed (PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a throwaway CA and two certificates it signed into `directory`.

    The server certificate is valid for 127.0.0.1 and localhost; the client one is for mutual
    TLS. Keys are P-256: quick to make, accepted by redis-server's OpenSSL and by Python's ssl.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Path:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.with_suffix(".key").chmod(0o600)
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def builder(subject: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("resumable_stream test CA")
    ca_cert = (
        builder("resumable_stream test CA", ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def leaf(subject: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(subject, ca_name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(authority, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return key, cert

    server = leaf(
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client = leaf("resumable_stream test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_cert = write(directory / "server.crt", *server)
    client_cert = write(directory / "client.crt", *client)
    return TlsFiles(
        ca_cert=ca_path,
        server_cert=server_cert,
        server_key=server_cert.with_suffix(".key"),
        client_cert=client_cert,
        client_key=client_cert.with_suffix(".key"),
    )


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1 with no persistence.

    `kill()` simulates a crash; `restart()` starts a fresh server on the same port, so clients
    configured with `url` can reconnect. Data does not survive a restart unless `extra_args`
    turn persistence on. With `tls`, the port speaks TLS only (`url` is `rediss://...`); with
    `unix_socket`, the server also listens on `socket_path` (`unix_url`); with `cluster`, it is
    a Redis Cluster node (its bus on `bus_port`, its state in `directory`/nodes.conf).
    `program` is the server to run: `redis-server`, or `valkey-server` (same options).
    """

    directory: Path
    port: int = 0
    program: str = "redis-server"
    extra_args: Sequence[str] = ()
    tls: TlsFiles | None = None
    unix_socket: bool = False
    cluster: bool = False
    cluster_node_timeout_ms: int = 3000
    bus_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca_cert))}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def unix_url(self) -> str:
        if not self.unix_socket:
            raise ValueError("this server was started without unix_socket=True")
        return f"unix://{self.socket_path}?db=0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **options: Any) -> redis.Redis:
        """A synchronous redis-py client of this server (decoding replies to str)."""
        import redis

        options.setdefault("socket_connect_timeout", 2)
        options.setdefault("socket_timeout", 10)
        options.setdefault("decode_responses", True)
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca_cert))
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def _command(self, executable: str) -> list[str]:
        directives = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": str(self.directory),
            "daemonize": "no",
            # Replicas sync at once, not after the default 5 s wait for more replicas.
            "repl-diskless-sync-delay": "0",
        }
        if self.tls is not None:
            directives |= {
                "port": "0",
                "tls-port": str(self.port),
                "tls-cert-file": str(self.tls.server_cert),
                "tls-key-file": str(self.tls.server_key),
                "tls-ca-cert-file": str(self.tls.ca_cert),
                # Clients may present a certificate (then it must be signed by the CA).
                "tls-auth-clients": "optional",
            }
        if self.unix_socket:
            directives |= {"unixsocket": str(self.socket_path), "unixsocketperm": "700"}
        if self.cluster:
            directives |= {
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                # Set explicitly: the default (port + 10000) may be taken or past 65535.
                "cluster-port": str(self.bus_port),
                "cluster-node-timeout": str(self.cluster_node_timeout_ms),
                # A replica may always take over, however long its master was gone.
                "cluster-replica-validity-factor": "0",
            }
        args = [arg for key, value in directives.items() for arg in (f"--{key}", value)]
        return [executable, *args, *self.extra_args]

    def _pings(self) -> bool:
        import redis

        client = self.client(socket_connect_timeout=0.5, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> RedisServer:
        executable = _redis_executable(self.program)
        keep_port = self.port != 0
        for _attempt in range(3):
            if not keep_port:
                self.port = free_port()
                self.bus_port = free_port() if self.cluster else 0
            log_start = self.log.stat().st_size if self.log.exists() else 0
            with self.log.open("ab") as log:
                process = spawn_for_the_session(
                    dies_with_us(self._command(executable)),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Ctrl-C reaches pytest only, which then stops the server in order.
                    start_new_session=True,
                )
            try:
                wait_until_ready(
                    self._pings,
                    what=f"{Path(executable).name} on port {self.port}",
                    process=process,
                    log=self.log,
                )
            except ServiceUnavailable:
                _stop_process(process)
                # Another process may have taken the port between free_port() and the bind.
                if not keep_port and "Address already in use" in _read_from(self.log, log_start):
                    continue
                raise
            self.process = process
            return self
        raise ServiceUnavailable(f"{self.program} found no free port{_log_tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None:
            self.resume()  # a stopped process dies on SIGKILL too, but say so explicitly
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its sockets open and answers nothing, like a hung host."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server (harmless on a running one)."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            _stop_process(self.process)

    def restart(self) -> None:
        self.stop()
        self.start()


def start_redis_server(
    directory: Path,
    *,
    extra_args: Sequence[str] = (),
    tls: TlsFiles | None = None,
    unix_socket: bool = False,
    program: str = "redis-server",
) -> RedisServer:
    return RedisServer(
        directory=directory,
        extra_args=extra_args,
        tls=tls,
        unix_socket=unix_socket,
        program=program,
    ).start()


def _info(server: RedisServer, section: str) -> dict[str, str]:
    """`INFO section` with every value as a string; empty if the server does not answer."""
    import redis

    client = server.client(socket_connect_timeout=0.5, socket_timeout=2)
    try:
        return {key: str(value) for key, value in client.info(section).items()}
    except redis.exceptions.RedisError:
        return {}
    finally:
        client.close()


def _wait_for(condition: Callable[[], bool], *, what: str, timeout: float) -> None:
    """Poll a condition of external processes (a cluster, sentinels) until it holds."""
    try:
        wait_until_ready(condition, what=what, timeout=timeout)
    except ServiceUnavailable as exc:
        # Raised mid-test (after a failover, a migration): a failure, not a missing service.
        raise AssertionError(str(exc)) from None


# --- Redis Cluster -----------------------------------------------------------------------------

CLUSTER_SLOTS = 16384


@dataclass(frozen=True)
class ClusterNodeView:
    """One line of `CLUSTER NODES`, as one node sees another."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def _parse_cluster_nodes(text: str) -> list[ClusterNodeView]:
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        slots = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being imported or migrated
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        views.append(
            ClusterNodeView(
                node_id=fields[0],
                port=int(address.rsplit(":", 1)[1]),
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
                slots=tuple(slots),
            )
        )
    return views


@dataclass
class SlotMigration:
    """A slot half-way between two masters: keys still on the source answer there, the rest
    get `ASK` redirections to the target. Made by `RedisClusterService.migrating_slot`."""

    cluster: RedisClusterService
    slot: int
    source: RedisServer
    target: RedisServer
    source_id: str
    target_id: str

    def move_keys(self) -> int:
        """MIGRATE every key now in the slot from the source to the target; returns how many."""
        moved = 0
        client = self.source.client()
        try:
            while True:
                keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100)
                if not keys:
                    return moved
                client.execute_command(
                    "MIGRATE", "127.0.0.1", self.target.port, "", 0, 10_000, "KEYS", *keys
                )
                moved += len(keys)
        finally:
            client.close()

    def finish(self) -> None:
        """Move the keys left, then give the slot to the target on every master."""
        self.move_keys()
        # The target first, then the source, then everyone else (Redis Cluster specification).
        nodes = [self.target, self.source]
        nodes += [
            self.cluster.node(view.port)
            for view in self.cluster.view()
            if view.is_master and view.port not in (self.target.port, self.source.port)
        ]
        for node in nodes:
            with contextlib.closing(node.client()) as client:
                client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
        self.cluster.wait_healthy(replicas=False)


@dataclass
class RedisClusterService:
    """A local Redis Cluster: 3 masters with one replica each, all on 127.0.0.1.

    Helpers are synchronous (redis-py's sync client, polling the cluster's own state with a
    deadline); from an async test call the slow ones through `asyncio.to_thread` so the event
    loop keeps serving producers and readers meanwhile.
    """

    directory: Path
    masters: int = 3
    node_timeout_ms: int = 3000
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """`redis+cluster://` with two seed nodes; clients discover the others."""
        seeds = ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])
        return f"redis+cluster://{seeds}"

    def node(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no cluster node on port {port}")

    def start(self) -> RedisClusterService:
        try:
            for index in range(2 * self.masters):
                directory = self.directory / f"node{index}"
                directory.mkdir(exist_ok=True)
                node = RedisServer(
                    directory=directory, cluster=True, cluster_node_timeout_ms=self.node_timeout_ms
                )
                self.nodes.append(node.start())
            redis_cli = shutil.which("redis-cli")
            if redis_cli is None:
                raise ServiceUnavailable("redis-cli is not installed (apt-get install redis-tools)")
            addresses = [f"127.0.0.1:{port}" for port in self.ports]
            options = ["--cluster-replicas", "1", "--cluster-yes"]
            created = subprocess.run(
                [redis_cli, "--cluster", "create", *addresses, *options],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if created.returncode != 0:
                raise ServiceUnavailable(
                    f"redis-cli --cluster create failed ({created.returncode}):\n"
                    f"{created.stdout}{created.stderr}"
                )
            self.wait_healthy(timeout=STARTUP_TIMEOUT, error=ServiceUnavailable)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    # -- state ---------------------------------------------------------------------------------

    def view(self, port: int | None = None) -> list[ClusterNodeView]:
        """`CLUSTER NODES` as seen by the node on `port` (default: the first one that answers)."""
        candidates = [self.node(port)] if port is not None else self.nodes
        for node in candidates:
            if not node.running:
                continue
            with contextlib.closing(node.client()) as client:
                try:
                    return _parse_cluster_nodes(str(client.execute_command("CLUSTER", "NODES")))
                except Exception:
                    if port is not None:
                        raise
        raise AssertionError("no cluster node answers CLUSTER NODES")

    def master_ports(self) -> list[int]:
        return sorted(v.port for v in self.view() if v.is_master and not v.failing and v.slots)

    def replica_of(self, master_port: int) -> int:
        """Port of a healthy replica of the master on `master_port`."""
        views = self.view()
        master_id = next(v.node_id for v in views if v.port == master_port)
        for view in views:
            if view.master_id == master_id and not view.failing:
                return view.port
        raise AssertionError(f"the master on port {master_port} has no healthy replica")

    def owner(self, s: int) -> int:
        """Port of the running master serving slot `s`.

        Right after a failover some nodes still name the dead master: the first node whose
        view names a running, non-failing owner answers.
        """
        for node in self.nodes:
            if not node.running:
                continue
            try:
                views = self.view(node.port)
            except Exception:
                continue
            for view in views:
                serves = view.is_master and any(first <= s <= last for first, last in view.slots)
                if serves and not view.failing and self.node(view.port).running:
                    return view.port
        raise AssertionError(f"no running master serves slot {s}")

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        from redis.crc import key_slot

        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def _node_id(self, port: int) -> str:
        with contextlib.closing(self.node(port).client()) as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def _healthy(self, *, replicas: bool) -> bool:
        running = [node for node in self.nodes if node.running]
        live_ports = {node.port for node in running}
        layouts = []
        for node in running:
            with contextlib.closing(node.client(socket_timeout=2)) as client:
                try:
                    state = str(client.execute_command("CLUSTER", "INFO"))
                    views = _parse_cluster_nodes(str(client.execute_command("CLUSTER", "NODES")))
                except Exception:
                    return False
            fields = dict(line.split(":", 1) for line in state.split() if ":" in line)
            if fields.get("cluster_state") != "ok":
                return False
            if fields.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                return False
            port_of = {view.node_id: view.port for view in views}
            # Who is what, as this node sees it: master -> its slots, replica -> its master.
            layout: dict[int, Any] = {}
            for view in views:
                if view.port not in live_ports:
                    if view.is_master and view.slots:
                        return False  # a dead master still serves slots
                    continue
                if view.failing:
                    return False
                if view.is_master:
                    layout[view.port] = view.slots
                else:
                    layout[view.port] = port_of.get(view.master_id or "")
            if set(layout) != live_ports:
                return False
            served = sum(
                last - first + 1
                for ranges in layout.values()
                if isinstance(ranges, tuple)
                for first, last in ranges
            )
            if served != CLUSTER_SLOTS:
                return False
            layouts.append(layout)
        if not layouts or any(layout != layouts[0] for layout in layouts):
            return False  # the nodes do not agree yet on who is what
        if replicas:
            serving = {
                port for port, what in layouts[0].items() if isinstance(what, tuple) and what
            }
            followed = {what for what in layouts[0].values() if isinstance(what, int)}
            if not serving <= followed:
                return False
            for node in running:
                role = _info(node, "replication")
                if role.get("role") == "slave" and role.get("master_link_status") != "up":
                    return False
        return True

    def wait_healthy(
        self,
        *,
        replicas: bool = True,
        timeout: float = 60.0,
        error: type[Exception] = AssertionError,
    ) -> None:
        """Wait until every running node says `cluster_state:ok`, all 16384 slots are served by
        running masters that every node agrees on, and (with `replicas`) every master has one
        replica in sync."""
        try:
            wait_until_ready(
                functools.partial(self._healthy, replicas=replicas),
                what="the Redis Cluster",
                timeout=timeout,
            )
        except ServiceUnavailable as exc:
            raise error(f"{exc}\n{self._describe()}") from None

    def _describe(self) -> str:
        lines = []
        for node in self.nodes:
            if not node.running:
                lines.append(f"port {node.port}: not running")
                continue
            try:
                view = next(v for v in self.view(node.port) if "myself" in v.flags)
                lines.append(f"port {node.port}: {sorted(view.flags)} {view.slots}")
            except Exception as exc:
                lines.append(f"port {node.port}: {exc!r}")
        return "\n".join(lines)

    # -- changes -------------------------------------------------------------------------------

    def flush(self) -> None:
        """FLUSHALL on every master (their replicas follow)."""
        for port in self.master_ports():
            with contextlib.closing(self.node(port).client()) as client:
                client.flushall()

    def heal(self) -> None:
        """Resume paused nodes, restart dead ones, and wait until the cluster is healthy."""
        for node in self.nodes:
            node.resume()
            if not node.running:
                # nodes.conf keeps its identity: it rejoins, as a replica if it lost its slots.
                node.start()
        self.wait_healthy()

    def kill(self, port: int) -> None:
        """SIGKILL one node. If it was a master, its replica takes over after the node timeout
        (`wait_healthy(replicas=False)` waits for that)."""
        self.node(port).kill()

    def restart(self, port: int) -> None:
        """Start a killed node again on its port (it comes back empty; nodes.conf keeps its
        identity and the cluster tells it its role)."""
        node = self.node(port)
        if node.running:
            node.kill()
        node.start()

    def failover(self, master_port: int) -> int:
        """Promote the replica of the master on `master_port` (`CLUSTER FAILOVER` on the
        replica: a manual failover that loses no acknowledged write). Returns the new master's
        port once every node agrees and the old master follows it."""
        replica = self.replica_of(master_port)
        with contextlib.closing(self.node(replica).client()) as client:
            client.execute_command("CLUSTER", "FAILOVER")

        def promoted() -> bool:
            return self._everyone_sees_master(replica)

        _wait_for(promoted, what=f"every node sees replica {replica} promoted", timeout=60)
        self.wait_healthy()
        return replica

    def _everyone_sees_master(self, port: int) -> bool:
        for node in self.nodes:
            if not node.running:
                continue
            try:
                views = self.view(node.port)
            except Exception:
                return False
            if not any(v.port == port and v.is_master and v.slots for v in views):
                return False
        return True

    def migrating_slot(self, slot: int, to_port: int) -> SlotMigration:
        """Start moving `slot` to the master on `to_port` (`CLUSTER SETSLOT ... IMPORTING` on
        the target, `MIGRATING` on the source). Call `move_keys()` to move what is there now,
        `finish()` to complete; in between, clients get `ASK` and `TRYAGAIN` replies."""
        source_port = self.owner(slot)
        if source_port == to_port:
            raise ValueError(f"slot {slot} is already on port {to_port}")
        migration = SlotMigration(
            cluster=self,
            slot=slot,
            source=self.node(source_port),
            target=self.node(to_port),
            source_id=self._node_id(source_port),
            target_id=self._node_id(to_port),
        )
        with contextlib.closing(migration.target.client()) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", migration.source_id)
        with contextlib.closing(migration.source.client()) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", migration.target_id)
        return migration

    def migrate_slot(self, slot: int, to_port: int) -> None:
        """Move `slot` and its keys to the master on `to_port`, as `redis-cli --cluster
        reshard` would."""
        self.migrating_slot(slot, to_port).finish()


def start_redis_cluster(directory: Path) -> RedisClusterService:
    return RedisClusterService(directory=directory).start()


# --- Redis Sentinel ----------------------------------------------------------------------------


@dataclass
class SentinelProcess(RedisServer):
    """A Redis Sentinel (`redis-server sentinel.conf --sentinel`) watching one master."""

    service: str = "resumable"
    master_port: int = 0
    quorum: int = 2
    down_after_ms: int = 2000
    failover_timeout_ms: int = 6000

    @property
    def config(self) -> Path:
        return self.directory / "sentinel.conf"

    def _command(self, executable: str) -> list[str]:
        # Sentinel rewrites its config file with what it learns; a restart keeps that state.
        if not self.config.exists() or f"port {self.port}\n" not in self.config.read_text():
            self.config.write_text(
                "\n".join(
                    [
                        f"port {self.port}",
                        "bind 127.0.0.1",
                        f"dir {self.directory}",
                        "daemonize no",
                        f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} "
                        f"{self.quorum}",
                        f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
                        f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {self.service} 1",
                        "",
                    ]
                )
            )
        return [executable, str(self.config), "--sentinel"]


def _pairs(reply: Any) -> dict[str, str]:
    """A SENTINEL MASTER/REPLICAS item as a dict of strings (RESP3 map or RESP2 flat list)."""
    if isinstance(reply, dict):
        return {str(key): str(value) for key, value in reply.items()}
    items = list(reply)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


@dataclass
class RedisSentinelService:
    """One master, one replica and three Sentinels, all on 127.0.0.1.

    Sentinels mark a silent master down after `down_after_ms` and fail over within a few
    seconds. Helpers are synchronous (polling the servers' and Sentinels' own state with a
    deadline); from an async test call the slow ones through `asyncio.to_thread`.
    """

    directory: Path
    service: str = "resumable"
    down_after_ms: int = 2000
    failover_timeout_ms: int = 6000
    servers: list[RedisServer] = field(default_factory=list)
    sentinels: list[SentinelProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """`redis+sentinel://S1,S2,S3/SERVICE/0`."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """For `redis.asyncio.sentinel.Sentinel(...)`."""
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def server(self, port: int) -> RedisServer:
        for server in self.servers:
            if server.port == port:
                return server
        raise KeyError(f"no Redis server of this Sentinel set-up on port {port}")

    def start(self) -> RedisSentinelService:
        try:
            master = RedisServer(directory=self._subdir("server0")).start()
            replica = RedisServer(
                directory=self._subdir("server1"),
                extra_args=("--replicaof", "127.0.0.1", str(master.port)),
            )
            self.servers += [master, replica.start()]
            # Sentinels learn replicas from the master's INFO, every 10 s: connect it first.
            _wait_for_replica_link(replica, timeout=STARTUP_TIMEOUT)
            for index in range(3):
                sentinel = SentinelProcess(
                    directory=self._subdir(f"sentinel{index}"),
                    service=self.service,
                    master_port=master.port,
                    down_after_ms=self.down_after_ms,
                    failover_timeout_ms=self.failover_timeout_ms,
                )
                self.sentinels.append(sentinel.start())
            self.wait_healthy(timeout=STARTUP_TIMEOUT, error=ServiceUnavailable)
        except BaseException:
            self.stop()
            raise
        return self

    def _subdir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(exist_ok=True)
        return path

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()

    # -- state ---------------------------------------------------------------------------------

    def _ask(self, sentinel: SentinelProcess, *command: Any) -> Any:
        with contextlib.closing(sentinel.client(socket_timeout=2)) as client:
            return client.execute_command("SENTINEL", *command)

    def master_port(self) -> int:
        """The master's port, as the Sentinels say (all must agree)."""
        answers = {
            int(self._ask(s, "GET-MASTER-ADDR-BY-NAME", self.service)[1]) for s in self.sentinels
        }
        if len(answers) != 1:
            raise AssertionError(f"the Sentinels disagree on the master: {sorted(answers)}")
        return answers.pop()

    def master(self) -> RedisServer:
        return self.server(self.master_port())

    def replica(self) -> RedisServer:
        master = self.master_port()
        return next(server for server in self.servers if server.port != master)

    def _healthy(self) -> bool:
        import redis

        try:
            master = self.master_port()
            for sentinel in self.sentinels:
                state = _pairs(self._ask(sentinel, "MASTER", self.service))
                if state.get("flags") != "master" or state.get("num-other-sentinels") != "2":
                    return False
                replicas = [_pairs(r) for r in self._ask(sentinel, "REPLICAS", self.service)]
                # Not their view of the replica's link: they refresh it every 10 s only.
                healthy = [r for r in replicas if r.get("flags") == "slave"]
                if len(healthy) != len(self.servers) - 1:
                    return False
        except (redis.exceptions.RedisError, AssertionError, IndexError, TypeError):
            return False
        for server in self.servers:
            role = _info(server, "replication")
            if server.port == master:
                if role.get("role") != "master" or role.get("connected_slaves") != "1":
                    return False
            elif (role.get("role"), role.get("master_link_status"), role.get("master_port")) != (
                "slave",
                "up",
                str(master),
            ):
                return False
        return True

    def wait_healthy(
        self, *, timeout: float = 60.0, error: type[Exception] = AssertionError
    ) -> None:
        """Wait until the three Sentinels agree on the master, know each other, and see its
        replica in sync; and the servers agree with them."""
        try:
            wait_until_ready(self._healthy, what="the Sentinel set-up", timeout=timeout)
        except ServiceUnavailable as exc:
            raise error(f"{exc}\n{self._describe()}") from None

    def _describe(self) -> str:
        lines = []
        for server in self.servers:
            role = _info(server, "replication") if server.running else {}
            lines.append(f"server {server.port}: running={server.running} {role.get('role')}")
        for sentinel in self.sentinels:
            try:
                state = _pairs(self._ask(sentinel, "MASTER", self.service))
                lines.append(
                    f"sentinel {sentinel.port}: master {state.get('port')} {state.get('flags')}"
                )
            except Exception as exc:
                lines.append(f"sentinel {sentinel.port}: {exc!r}")
        return "\n".join(lines)

    # -- changes -------------------------------------------------------------------------------

    def flush(self) -> None:
        """FLUSHALL on the master (the replica follows)."""
        with contextlib.closing(self.master().client()) as client:
            client.flushall()

    def heal(self) -> None:
        """Resume paused servers, restart dead ones as replicas of the current master, and
        wait until everything is healthy."""
        for process in [*self.servers, *self.sentinels]:
            process.resume()
        for sentinel in self.sentinels:
            if not sentinel.running:
                sentinel.start()
        dead = [server for server in self.servers if not server.running]
        if dead:
            # If the master died, the Sentinels promote the replica first.
            _wait_for(
                lambda: self._agreed_master() is not None,
                what="the Sentinels agree on a running master",
                timeout=60,
            )
            master = self._agreed_master()
            for server in dead:
                server.extra_args = ("--replicaof", "127.0.0.1", str(master))
                server.start()
        self.wait_healthy()

    def _agreed_master(self) -> int | None:
        try:
            port = self.master_port()
        except Exception:
            return None
        try:
            return port if self.server(port).running else None
        except KeyError:
            return None

    def failover(self, *, demote: bool = True) -> int:
        """`SENTINEL FAILOVER`: promote the replica, once it holds every write the master
        took before the call. Returns the new master's port once the Sentinels agree on it
        and the old master replicates from it (with `demote=False`, while the old master
        still takes writes, as it does until the Sentinels' next look at it: then call
        `demote(old, new)`).

        `SENTINEL FAILOVER` does not wait for the replica to catch up (replication is
        asynchronous): a write acknowledged just before it could be lost, as in a crash.
        This is the planned failover; `pause_replication()` and
        `fail_over_to_lagging_replica()` make the lossy one."""
        old = self.master_port()
        offset = int(_info(self.server(old), "replication")["master_repl_offset"])

        def caught_up() -> bool:
            replica = _info(self.replica(), "replication")
            return int(replica.get("slave_repl_offset", -1)) >= offset

        _wait_for(caught_up, what=f"the replica reaches offset {offset}", timeout=30)

        def started() -> bool:
            import redis

            try:
                self._ask(self.sentinels[0], "FAILOVER", self.service)
            except redis.exceptions.ResponseError:
                return False  # INPROG or NOGOODSLAVE (replica's state not yet refreshed)
            return True

        for attempt in range(3):
            _wait_for(started, what="SENTINEL FAILOVER accepted", timeout=30)
            try:
                # A failover can abort (the replica's state looked stale to the Sentinel
                # leading it); then it is asked again.
                new = self._wait_for_new_master(old, timeout=self.failover_timeout_ms / 500 + 10)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        if demote:
            self.demote(old, new)
        return new

    def demote(self, old: int, new: int) -> None:
        """Turn the old master into a replica of the new one, as the Sentinels do at their
        next INFO, up to 10 s after a failover (it takes writes meanwhile), and wait until
        it follows: what only it had is dropped."""
        with contextlib.closing(self.server(old).client()) as client:
            client.execute_command("REPLICAOF", "127.0.0.1", new)
        self.wait_healthy()

    def _wait_for_new_master(self, old: int, *, timeout: float = 60.0) -> int:
        def moved() -> bool:
            port = self._agreed_master()
            return port is not None and port != old

        _wait_for(moved, what=f"the Sentinels promote a new master (was {old})", timeout=timeout)
        new = self.master_port()
        _wait_for(
            lambda: _info(self.server(new), "replication").get("role") == "master",
            what=f"server {new} becomes master",
            timeout=60,
        )
        return new

    def kill_master(self) -> int:
        """SIGKILL the master; returns its port. The Sentinels promote the replica after
        `down_after_ms` (`wait_for_failover` waits for that)."""
        old = self.master_port()
        self.server(old).kill()
        return old

    def wait_for_failover(self, old_master: int) -> int:
        """Wait until the Sentinels promoted a master other than `old_master`; its port."""
        return self._wait_for_new_master(old_master)

    def pause_replication(self) -> None:
        """Cut the replica off: SIGSTOP it and close its link on the master, so writes from
        now on reach the master only. (SIGSTOP alone is not enough: what the master already
        sent waits in the stopped replica's socket and would be applied when it resumes.)"""
        replica, master = self.replica(), self.master()
        replica.pause()
        with contextlib.closing(master.client()) as client:
            client.execute_command("CLIENT", "KILL", "TYPE", "replica")
        _wait_for(
            lambda: _info(master, "replication").get("connected_slaves") == "0",
            what="the master drops its replica",
            timeout=30,
        )

    def fail_over_to_lagging_replica(self) -> int:
        """After `pause_replication()`: SIGKILL the master, SIGCONT the replica, and wait until
        the Sentinels promote it. Writes made since the pause are lost, as asynchronous
        replication loses them. Returns the new master's port."""
        old = self.master_port()
        replica = self.replica()
        self.server(old).kill()
        replica.resume()
        return self._wait_for_new_master(old)


def _wait_for_replica_link(replica: RedisServer, *, timeout: float) -> None:
    def linked() -> bool:
        return _info(replica, "replication").get("master_link_status") == "up"

    wait_until_ready(linked, what=f"replica {replica.port} in sync", timeout=timeout)


def start_redis_sentinel(directory: Path) -> RedisSentinelService:
    return RedisSentinelService(directory=directory).start()


# --- PostgreSQL --------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """Directory with initdb and postgres: from PATH, else Debian's newest /usr/lib/postgresql/N."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        raise ServiceUnavailable("PostgreSQL's initdb not found (apt-get install postgresql)")
    newest = max(candidates, key=lambda path: int(Path(path).parent.parent.name))
    return Path(newest).parent


@dataclass
class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, trust auth, loopback only.

    The postmaster is this process's child (not daemonized by pg_ctl), so it dies with the test
    session even when pytest is killed. PostgreSQL refuses to run as root, so as root initdb and
    the server run as the `postgres` user; the directory lives under the system temp dir because
    pytest's own temp dirs are private to root.
    """

    directory: Path
    bindir: Path
    port: int = 0
    database: str = "resumable_stream_test"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"

    def _command(self, program: str, *args: str) -> list[str]:
        return dies_with_us([str(self.bindir / program), *args], as_postgres=os.geteuid() == 0)

    def start(self) -> PostgresCluster:
        initdb = subprocess.run(
            self._command(
                "initdb",
                f"--pgdata={self.data}",
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if initdb.returncode != 0:
            raise ServiceUnavailable(
                f"initdb failed with code {initdb.returncode}:\n{initdb.stdout}{initdb.stderr}"
            )
        for _attempt in range(3):
            port = free_port()
            settings = {
                "port": str(port),
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(self.directory / "sockets"),
                # Durability is pointless for a throwaway cluster and costs seconds.
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
            }
            args = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
            log_start = self.log.stat().st_size if self.log.exists() else 0
            with self.log.open("ab") as log:
                process = subprocess.Popen(
                    self._command("postgres", "-D", str(self.data), *args),
                    cwd=self.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Ctrl-C reaches pytest only, which then stops the server in order.
                    start_new_session=True,
                )
            try:
                wait_until_ready(
                    functools.partial(_postgres_accepts, port),
                    what=f"PostgreSQL on port {port}",
                    process=process,
                    log=self.log,
                )
            except ServiceUnavailable:
                _stop_process(process, first=signal.SIGQUIT)
                # Another process may have taken the port between free_port() and the bind.
                if "Address already in use" in _read_from(self.log, log_start):
                    continue
                raise
            self.port, self.process = port, process
            break
        else:
            raise ServiceUnavailable(f"PostgreSQL found no free port{_log_tail(self.log)}")
        try:
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def _create_database(self) -> None:
        import psycopg
        from psycopg import sql

        admin_dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def stop(self) -> None:
        """Fast shutdown: SIGINT disconnects clients and stops cleanly."""
        if self.process is not None:
            _stop_process(self.process, first=signal.SIGINT)


def _postgres_accepts(port: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _remove_stale_postgres_dirs() -> None:
    """Delete cluster directories left by test sessions that were killed."""
    for owner_file in Path(tempfile.gettempdir()).glob(f"{PG_DIR_PREFIX}*/owner"):
        with contextlib.suppress(OSError, ValueError):
            owner = int(owner_file.read_text())
            if not _pid_alive(owner):
                shutil.rmtree(owner_file.parent, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Create, start, yield, then stop and delete a throwaway PostgreSQL cluster."""
    bindir = postgres_bindir()
    _remove_stale_postgres_dirs()
    directory = Path(tempfile.mkdtemp(prefix=PG_DIR_PREFIX))
    try:
        (directory / "owner").write_text(str(os.getpid()))
        (directory / "sockets").mkdir()
        if os.geteuid() == 0:
            try:
                for path in (directory, directory / "sockets"):
                    shutil.chown(path, user="postgres")
            except LookupError as exc:
                raise ServiceUnavailable(NO_POSTGRES_USER) from exc
        cluster = PostgresCluster(directory=directory, bindir=bindir).start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- Chromium ----------------------------------------------------------------------------------


def chromium_executable() -> str:
    """Debian's Chromium (or $CHROMIUM_PATH), checked to run with --version."""
    candidates = [os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium")]
    path = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if path is None:
        raise ServiceUnavailable("Chromium not found (apt-get install chromium)")
    try:
        result = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceUnavailable(f"{path} --version failed: {exc}") from exc
    if result.returncode != 0 or "Chromium" not in result.stdout:
        raise ServiceUnavailable(
            f"{path} --version exited {result.returncode}: {result.stdout}{result.stderr}"
        )
    return path


def launch_chromium(playwright: Playwright, executable_path: str | None = None) -> Browser:
    """Launch Debian's Chromium through Playwright's sync API (it never downloads a browser)."""
    return playwright.chromium.launch(
        executable_path=executable_path or chromium_executable(),
        headless=True,
        args=list(CHROMIUM_ARGS),
    )


async def launch_chromium_async(
    playwright: AsyncPlaywright, executable_path: str | None = None
) -> AsyncBrowser:
    """`launch_chromium` for Playwright's async API, for use inside async tests."""
    return await playwright.chromium.launch(
        executable_path=executable_path or chromium_executable(),
        headless=True,
        args=list(CHROMIUM_ARGS),
    )


# --- uvicorn, in a thread ----------------------------------------------------------------------


class _ThreadServer(uvicorn.Server):
    """A uvicorn server that tells another thread when its startup is over, however it ended."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_over = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.startup_over.set()


@contextlib.contextmanager
def uvicorn_server(app: Any, *, graceful_timeout: float = 5.0, **config: Any) -> Iterator[str]:
    """Serve an ASGI app (object or "module:attr") with real uvicorn in a background thread.

    Yields the base URL, e.g. "http://127.0.0.1:43121". The listening socket is bound before the
    thread starts, so there is no free-port race. On exit, open responses (endless SSE streams)
    get `graceful_timeout` seconds before uvicorn cancels them. Extra keyword arguments go to
    `uvicorn.Config`.
    """
    config.setdefault("log_level", "warning")
    config.setdefault("timeout_graceful_shutdown", graceful_timeout)
    server = _ThreadServer(uvicorn.Config(app, host="127.0.0.1", port=0, **config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            server.startup_over.set()  # also when the config fails to load

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        if not server.startup_over.wait(STARTUP_TIMEOUT) or not server.started:
            raise RuntimeError(f"uvicorn did not start serving {app!r} on port {port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(graceful_timeout + STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"uvicorn on port {port} did not shut down")


# --- any server, in a subprocess ---------------------------------------------------------------


@dataclass
class AppProcess:
    """A server running in its own process group; `url` is its base URL."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would; returns once it is reaped."""
        _signal(self.process, signal.SIGKILL, group=True)
        self.process.wait()

    def terminate(self) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if it outlives STOP_TIMEOUT."""
        _stop_process(self.process, group=True)

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace")


def uvicorn_command(app: str, *extra: str) -> list[str]:
    """The command for `run_app_subprocess` that serves `app` ("module:attr") with uvicorn."""
    options = ["--host=127.0.0.1", "--port={port}", "--log-level=warning"]
    return [sys.executable, "-m", "uvicorn", app, *options, *extra]


@contextlib.contextmanager
def run_app_subprocess(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | str = REPO_ROOT,
    timeout: float = STARTUP_TIMEOUT,
) -> Iterator[AppProcess]:
    """Run a server command in a subprocess on a free loopback port, until the block exits.

    "{port}" in any argument is replaced by the chosen port, which is also in $PORT. `env`
    is added to the current environment. Yields an `AppProcess` once the port accepts
    connections; tests can `kill()` it to simulate a crash. Output goes to `AppProcess.log`.
    The process gets SIGTERM if the thread that started it exits, so enter this from the
    test's own thread (setpriv's --pdeathsig follows the parent thread, not the process).
    """
    with tempfile.TemporaryDirectory(prefix="resumable-stream-app-") as tmp:
        log = Path(tmp) / "output.log"
        for _attempt in range(3):
            port = free_port()
            full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), "PORT": str(port)}
            with log.open("ab") as log_file:
                process = subprocess.Popen(
                    dies_with_us([arg.replace("{port}", str(port)) for arg in cmd]),
                    cwd=cwd,
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            app = AppProcess(f"http://127.0.0.1:{port}", port, process, log)
            try:
                wait_until_ready(
                    functools.partial(port_accepts, port),
                    what=" ".join(cmd),
                    process=process,
                    log=log,
                    timeout=timeout,
                )
            except ServiceUnavailable as exc:
                app.terminate()
                if "address already in use" in app.output().lower():
                    continue
                raise RuntimeError(str(exc)) from None
            try:
                yield app
            finally:
                app.terminate()
            return
        raise RuntimeError(f"{' '.join(cmd)} found no free port")
