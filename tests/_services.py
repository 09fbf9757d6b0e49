"""Real external services for the test suite: redis-server, PostgreSQL, Chromium, uvicorn.

Every helper here starts a real process (or thread) on a free loopback port, waits until it
answers, and stops it again. Readiness is polled with a deadline only while waiting for an
external process to come up; nothing here sleeps to wait for anything else.

Server processes die with the test session even when pytest itself is killed (`dies_with_us`).
A missing service raises `ServiceUnavailable`; `conftest.py` turns that into a skip locally and
a failure under `CI=true` (see `unavailable`).
"""

from __future__ import annotations

import contextlib
import functools
import glob
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

import pytest
import uvicorn

if TYPE_CHECKING:
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1 with no persistence.

    `kill()` simulates a crash; `restart()` starts a fresh server on the same port, so clients
    configured with `url` can reconnect. Data does not survive a restart unless `extra_args`
    turn persistence on.
    """

    directory: Path
    port: int = 0
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise ServiceUnavailable("redis-server is not installed (apt-get install redis-server)")
        keep_port = self.port != 0
        for _attempt in range(3):
            port = self.port if keep_port else free_port()
            directives = {
                "port": str(port),
                "bind": "127.0.0.1",
                "save": "",
                "appendonly": "no",
                "dir": str(self.directory),
                "daemonize": "no",
            }
            args = [arg for key, value in directives.items() for arg in (f"--{key}", value)]
            log_start = self.log.stat().st_size if self.log.exists() else 0
            with self.log.open("ab") as log:
                process = subprocess.Popen(
                    dies_with_us([executable, *args, *self.extra_args]),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Ctrl-C reaches pytest only, which then stops the server in order.
                    start_new_session=True,
                )
            try:
                wait_until_ready(
                    functools.partial(_redis_pings, port),
                    what=f"redis-server on port {port}",
                    process=process,
                    log=self.log,
                )
            except ServiceUnavailable:
                _stop_process(process)
                # Another process may have taken the port between free_port() and the bind.
                if not keep_port and "Address already in use" in _read_from(self.log, log_start):
                    continue
                raise
            self.port, self.process = port, process
            return self
        raise ServiceUnavailable(f"redis-server found no free port{_log_tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process)

    def restart(self) -> None:
        self.stop()
        self.start()


def _redis_pings(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def start_redis_server(directory: Path, *, extra_args: Sequence[str] = ()) -> RedisServer:
    return RedisServer(directory=directory, extra_args=extra_args).start()


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
