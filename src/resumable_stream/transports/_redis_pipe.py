"""Pipelined and sharded-pub/sub connections of the Redis transport, on redis-py.

Connecting (TCP, unix socket, TLS), authentication (password, ACL user, credential
provider), ``HELLO`` (RESP3), ``SELECT``, the client name and Sentinel's master look-up are
redis-py's: every connection here is made by the user's pool or cluster node
(``make_connection()`` / ``connection_class(**connection_kwargs)``) and opened with its
``connect()``. Replies are then parsed by hiredis with redis-py's error classes, where they
arrive (:class:`_Replies`, the socket's protocol from then on). What redis-py's pool does
not give is what makes the transport fast:

* :class:`Pipe`: one connection shared by every task of the process. Commands are packed
  once (hiredis' packer), everything queued in one event-loop turn goes out in one write,
  and replies resolve their futures in order as they are parsed: any number in flight, no
  task or timer per command, no task waking up to read. A caller cancelled while waiting
  leaves the connection in step (its reply is read and dropped).
* :class:`Subscriber`: one sharded pub/sub connection, ``SSUBSCRIBE`` per channel (Redis
  refuses one ``SSUBSCRIBE`` over channels of several slots), re-subscribed after a
  reconnection; messages are handed over as they are parsed. Silent for the timeout, it
  sends a ``PING``, and is dropped if that is not answered either (a hung server).

Replies that are errors are returned as redis-py exception objects (the caller classifies
them, see :func:`error_code`); a lost connection or a silent server fails the commands in
flight with :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

try:
    import hiredis
    from redis import exceptions as rex
    from redis._parsers import BaseParser
    from redis.asyncio.connection import AbstractConnection
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Redis transport needs redis-py and hiredis: pip install 'resumable-llm-stream[redis]'"
    ) from exc

from .. import telemetry
from .._constants import TIMER_SLACK
from .._exceptions import BackendRefused, TransportClosed, TransportError

logger = logging.getLogger("resumable_stream.redis")

Arg = bytes | str | int
ConnectionFactory = Callable[[], AbstractConnection]

#: Error codes of faults a retry may fix (a failover, a cluster reconfiguring).
TRANSIENT_CODES = frozenset({"TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "BUSY"})
#: Error codes meaning "this connection talks to the wrong server now": drop it and
#: reconnect (Sentinel resolves the master again). UNBLOCKED: a WAIT cut short as its
#: master was turned into a replica (a failover); Redis closes the connection after it.
RECONNECT_CODES = frozenset({"READONLY", "LOADING", "UNBLOCKED"})
#: Seconds between reconnection attempts of a subscriber.
RECONNECT_DELAY = 0.5
#: The most a subscriber waits between attempts while Redis refuses it (no permission to
#: SSUBSCRIBE, a wrong password): the wait doubles from RECONNECT_DELAY up to this.
REFUSED_DELAY_MAX = 30.0
#: Seconds a left channel may stay subscribed: SUNSUBSCRIBEs go out with the next
#: SSUBSCRIBE, or after this long, in one write (issue 8: a write per stream ended cost a
#: wake-up of Redis and of this process each, on the path of every run's end).
UNSUBSCRIBE_DELAY = 0.1
#: Seconds a discarded connection may take to close (a TLS close_notify round trip)
#: before it is aborted.
CLOSE_TIMEOUT = 1.0


def pack(*args: Arg) -> bytes:
    """One command in RESP, packed by hiredis."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # a tuple of any length
    return packed


# redis-py before 5.1 keeps no ``status_code``: the error replies it knows become these
# classes with the code cut from the message (subclasses before their base class).
_CODE_OF_CLASS: tuple[tuple[type[BaseException], str], ...] = (
    (rex.NoScriptError, "NOSCRIPT"),
    (rex.ReadOnlyError, "READONLY"),
    (rex.BusyLoadingError, "LOADING"),
    (rex.ExecAbortError, "EXECABORT"),
    (rex.OutOfMemoryError, "OOM"),
    (rex.NoPermissionError, "NOPERM"),
    (rex.MovedError, "MOVED"),
    (rex.AskError, "ASK"),
    (rex.TryAgainError, "TRYAGAIN"),
    (rex.MasterDownError, "MASTERDOWN"),
    (rex.ClusterDownError, "CLUSTERDOWN"),
    (rex.ClusterCrossSlotError, "CROSSSLOT"),
)


def _known_code(error: BaseException) -> str | None:
    """The code of an error reply redis-py made into one of its classes, if it did."""
    code = getattr(error, "status_code", None)
    if code:
        return str(code)
    for cls, known in _CODE_OF_CLASS:
        if isinstance(error, cls):
            return known
    return None


def error_code(error: BaseException) -> str:
    """The Redis error code of an error reply (``MOVED``, ``OOM``, ``ERR``...)."""
    # The errors redis-py does not know keep their code in front of the message.
    return _known_code(error) or str(error).split(" ", 1)[0]


def describe(error: BaseException) -> str:
    """An error reply as Redis wrote it: its code, then the message."""
    text = str(error)
    code = _known_code(error)
    return f"{code} {text}" if code and not text.startswith(code) else text


def fault(error: BaseException, what: str) -> TransportError:
    """Our exception for a redis-py (or socket) error met while doing ``what``."""
    if isinstance(error, TransportError):
        return error
    if isinstance(error, rex.AuthenticationError | rex.AuthorizationError):
        return BackendRefused(f"Redis refused {what}: {describe(error)}")
    if isinstance(error, rex.ConnectionError | rex.TimeoutError):
        # Also LOADING and "max number of clients reached", which redis-py raises as these.
        if _known_code(error):  # LOADING (redis-py before 5.1 keeps no status_code)
            return TransportError(f"Redis is not ready for {what}: {describe(error)}")
        return TransportError(f"Redis connection failed during {what}: {error}")
    if isinstance(error, rex.ResponseError) or (
        isinstance(error, rex.RedisError) and getattr(error, "status_code", None)
    ):
        code = error_code(error)
        if code in TRANSIENT_CODES or code in RECONNECT_CODES:
            return TransportError(f"Redis is not ready for {what}: {describe(error)}")
        return BackendRefused(f"Redis refused {what}: {describe(error)}")
    if isinstance(error, rex.DataError | TypeError | ValueError):
        return BackendRefused(f"Redis refused {what}: {error}")
    return TransportError(f"Redis connection failed during {what}: {error}")


def refused_delay(refusals: int) -> float:
    """Seconds before a subscriber's next attempt after ``refusals`` refusals in a row."""
    if refusals <= 0:
        return RECONNECT_DELAY
    return min(RECONNECT_DELAY * 2.0 ** min(refusals, 16), REFUSED_DELAY_MAX)


async def _discard(connection: AbstractConnection, protocol: _Replies | None) -> None:
    """Close ``connection`` (read by ``protocol`` once set up) and wait until its socket
    is closed.

    redis-py's ``disconnect(nowait=True)`` only starts closing: a TLS connection sends
    close_notify and closes its socket once the server answers, so a transport closed just
    before its event loop left the socket open (ResourceWarning, issue 8). Wait a bounded
    time for the close; past it, or when cancelled, abort the connection.
    """
    # Shielded: a second cancellation must not leave the socket open.
    with contextlib.suppress(Exception):
        await asyncio.shield(connection.disconnect(nowait=True))
    if protocol is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(protocol.closed), CLOSE_TIMEOUT)
    except asyncio.CancelledError:
        protocol.transport.abort()
        raise
    except Exception:  # no answer in time: drop it now
        protocol.transport.abort()


#: What the reply reader gives while a reply is incomplete (False is a RESP3 reply).
_INCOMPLETE: Any = object()
_PING = pack("PING")
#: hiredis' type for RESP3 push messages (pub/sub, invalidations): never a command's reply.
_PUSH: type | None = getattr(hiredis, "PushNotification", None)


class NoAnswer(TransportError):
    """The server stayed silent past the timeout while replies were owed: slow, or gone."""


class _Replies(asyncio.Protocol):
    """Takes over a redis-py connection's socket once it is set up (TLS, AUTH, HELLO,
    SELECT done) and has ``on_data(reader)`` take the replies from ``data_received``:
    replies are parsed where they arrive, with redis-py's error classes, and no task wakes
    up to read them (one event-loop turn and a few coroutines less per reply; issue 11).
    ``on_data`` takes each complete reply with ``reader.gets(False)`` (:data:`_INCOMPLETE`
    once none is left).

    ``lost`` fails when the connection ends or ``on_data`` raises.
    """

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        on_data: Callable[[hiredis.Reader], None],
        parse_error: Callable[[str], Any],
    ) -> None:
        self.transport = transport
        self._reader = hiredis.Reader(
            protocolError=rex.InvalidResponse,
            replyError=parse_error,
            notEnoughData=_INCOMPLETE,
        )
        self._on_data = on_data
        #: Set whenever data arrives (a keep-alive clears it to see if more comes).
        self.heard = False
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        #: Done once the socket is closed.
        self.closed: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self.lost.done():
            return
        self.heard = True
        try:
            self._reader.feed(data)
            self._on_data(self._reader)
        except Exception as exc:  # a protocol error, or a reply that makes no sense here
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or rex.ConnectionError("Redis closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_exception(exc)

    async def keep_alive(self, silence: float) -> None:
        """PING the server once the connection was silent for ``silence`` seconds, and end
        the connection (``lost``) if that brings nothing within as long: a server that
        hangs, or a host gone without closing the socket, is otherwise waited on for good
        by a connection that owes no reply (a subscriber's)."""
        while True:
            self.heard = False
            await asyncio.sleep(silence)
            if self.heard:
                continue
            self.transport.write(_PING)
            await asyncio.sleep(silence)
            if not self.heard:
                self._fail(NoAnswer(f"Redis did not answer a PING within {silence:g} s"))
                self.transport.abort()
                return


def _each(on_reply: Callable[[Any], None]) -> Callable[[hiredis.Reader], None]:
    """An ``on_data`` for :class:`_Replies` that calls ``on_reply`` with each reply."""

    def take(reader: hiredis.Reader) -> None:
        while (reply := reader.gets(False)) is not _INCOMPLETE:
            on_reply(reply)

    return take


def _take_over(
    connection: AbstractConnection, on_data: Callable[[hiredis.Reader], None]
) -> _Replies:
    """Read ``connection``'s replies with a :class:`_Replies` from now on."""
    writer = connection._writer
    if writer is None:
        raise TransportError("the Redis connection closed while it was being set up")
    # Error replies become the exceptions the connection's own parser makes (a cluster
    # node's parser knows MOVED and ASK on every redis-py version).
    parse_error = getattr(connection._parser, "parse_error", BaseParser.parse_error)
    protocol = _Replies(writer.transport, on_data, parse_error)
    writer.transport.set_protocol(protocol)
    return protocol


class _Session:
    """One connection's life: the commands written to it and the replies it owes."""

    __slots__ = (
        "address", "flushed_at", "flushing", "held", "hooks", "last", "outgoing", "pending",
        "stream", "task", "timed_out", "timer",
    )  # fmt: skip

    def __init__(self, *, last: bool = False) -> None:
        # What each reply owed goes to, in order: the future of a command sent, or the
        # callback of one posted.
        self.pending: collections.deque[asyncio.Future[Any] | Callable[[Any], None]] = (
            collections.deque()
        )
        # (future, hook) of the pending commands sent with an on_reply hook, in order.
        self.hooks: collections.deque[tuple[asyncio.Future[Any], Callable[[Any], None]]] = (
            collections.deque()
        )
        self.outgoing: list[bytes] = []
        self.stream: asyncio.WriteTransport | None = None  # set once connected
        self.flushing = False
        self.flushed_at = -1e9  # loop time of the last write
        self.timer: asyncio.TimerHandle | None = None  # the write put off, if it is
        self.task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None  # the server's, once connected
        self.timed_out = False  # its task is cancelled by the watchdog
        # Opened while the event loop shuts down (see Pipe._run): closed once it owes no
        # reply, and what it owes is handed over once its task has ended, in `held`.
        self.last = last
        self.held: list[tuple[asyncio.Future[Any] | Callable[[Any], None], Any]] = []

    def answer(self, owed: asyncio.Future[Any] | Callable[[Any], None], reply: Any) -> None:
        """Hand ``reply`` (or the TransportError that ended the connection) to ``owed``."""
        if self.last and self.task is not None and not self.task.done():
            self.held.append((owed, reply))
        elif not isinstance(owed, asyncio.Future):  # posted
            _call_hook(owed, reply)
        elif owed.done():  # its caller was cancelled; the reply is dropped
            pass
        elif isinstance(reply, TransportError):
            owed.set_exception(reply)
        else:
            owed.set_result(reply)  # an error reply is returned too, as an exception

    def hand_over(self) -> None:
        """Its task has ended: hand what was held to its callers."""
        held, self.held = self.held, []
        for owed, reply in held:
            self.answer(owed, reply)

    def fail(self, error: TransportError) -> None:
        self.outgoing.clear()
        self.hooks.clear()
        while self.pending:
            self.answer(self.pending.popleft(), error)


def _call_hook(hook: Callable[[Any], None], reply: Any) -> None:
    try:
        hook(reply)
    except Exception:  # a bug in the hook: not the connection's fault
        logger.exception("Redis: a reply hook failed")


class Pipe:
    """One pipelined connection, opened on first use and reopened after a fault.

    ``timeout``: seconds the server may stay silent while replies are owed before the
    connection is dropped (the redis-py ``socket_timeout``, or a default).
    ``setup_timeout``: seconds the connection's set-up may take instead, redis-py's own
    time-outs bounding each step (default ``timeout``): a Sentinel look-up gives up on a
    silent Sentinel after its time-out and asks the next.
    ``write_interval``: least seconds between two writes; what is queued meanwhile goes
    out in the next one (0: a write per event-loop turn). A command whose reply a caller
    awaits goes out at the next turn when Redis owes no reply (posted ones wait).
    """

    def __init__(
        self,
        make: ConnectionFactory,
        *,
        timeout: float,
        name: str,
        write_interval: float = 0.0,
        on_connect: Callable[[], None] | None = None,
        setup_timeout: float | None = None,
    ) -> None:
        self._make = make
        self._on_connect = on_connect
        self._timeout = timeout
        self._setup_timeout = max(timeout, setup_timeout or 0.0)
        self._write_interval = write_interval
        self.name = name
        self._session: _Session | None = None  # the one new commands go to
        self._tasks: set[asyncio.Task[None]] = set()
        self._progress = 0.0  # when a reply last came, or the first owed one was queued
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # The event loop shutting down: it cancelled our task (see _run).
        self._shutting_down: asyncio.AbstractEventLoop | None = None
        #: Connections opened so far (tests and metrics).
        self.connects = 0

    def submit(self, *packed: bytes) -> list[asyncio.Future[Any]]:
        """Queue packed commands, adjacent on the wire; a future per reply.

        A reply that is an error is the redis-py exception object (not raised).
        """
        loop = asyncio.get_running_loop()
        session = self._queue(loop)
        futures = [loop.create_future() for _ in packed]
        session.outgoing.extend(packed)
        session.pending.extend(futures)
        self._schedule(loop, session)
        return futures

    def send(
        self, packed: bytes, on_reply: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Queue one packed command; the future of its reply (as :meth:`submit`, without
        a list: the hot path of appends and live fetches).

        ``on_reply(reply)`` is called as the reply is parsed, before the future's waiter
        runs (not if the connection fails first).
        """
        loop = asyncio.get_running_loop()
        session = self._queue(loop)
        future = loop.create_future()
        session.outgoing.append(packed)
        session.pending.append(future)
        if on_reply is not None:
            session.hooks.append((future, on_reply))
        self._schedule(loop, session)
        return future

    def post(self, packed: bytes, on_reply: Callable[[Any], None]) -> None:
        """Queue one packed command whose reply goes to ``on_reply`` alone, with no future
        and no task waiting: it is called as the reply is parsed, or with the
        :class:`TransportError` that ended the connection first (exactly once, either way).
        """
        session = self._session
        if session is None or not session.pending or self._closed:
            session = self._queue(asyncio.get_running_loop())  # (else it would do nothing)
        session.outgoing.append(packed)
        session.pending.append(on_reply)
        if not session.flushing:
            self._schedule(asyncio.get_running_loop(), session, awaited=False)

    def _queue(self, loop: asyncio.AbstractEventLoop) -> _Session:
        """The session new commands go to (connecting it if need be), its watchdog armed."""
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        session = self._session
        if session is None:
            session = self._session = _Session(last=loop is self._shutting_down)
            task = session.task = loop.create_task(
                self._run(session), name=f"rstream redis {self.name}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if session.last:
                # Also when the task is cancelled before it ran (closed in this event-loop
                # turn): its own code, which hands the replies over, never runs then.
                task.add_done_callback(lambda _: session.hand_over())
        if not session.pending:
            self._progress = loop.time()
            if self._watchdog is None or self._watchdog_loop is not loop:
                # (One armed on an event loop that has ended never fires: a transport kept
                # from one loop to the next, as by tests, one loop each.)
                self._watchdog_loop = loop
                self._watchdog = loop.call_at(self._progress + self._timeout, self._check)
        return session

    def _schedule(
        self, loop: asyncio.AbstractEventLoop, session: _Session, awaited: bool = True
    ) -> None:
        """Have what ``session`` queued written: with what comes until the write interval
        has passed since the last write (and two loop turns more, see _timed_out_write),
        or at the next loop turn once it has, or if a caller awaits the reply
        (``awaited``) and Redis owes none."""
        if session.stream is None:
            return  # (written once connected)
        # A chain of awaited commands (a reader attaching, a run starting) would wait for
        # the interval at each step, and asyncio's epoll wait rounds a sleep under 1 ms up
        # to 1 ms when nothing else wakes the loop: with Redis idle, such a command goes
        # out now. (Every command queued is owed a reply: none for those written.)
        now_for_awaited = awaited and len(session.pending) == len(session.outgoing)
        if not session.flushing:
            session.flushing = True
            due = session.flushed_at + self._write_interval
            if due > loop.time() and not now_for_awaited:
                session.timer = loop.call_at(due, self._timed_out_write, loop, session)
            else:
                loop.call_soon(self._flush, session)
        elif now_for_awaited and session.timer is not None:  # behind a posted command
            session.timer.cancel()
            session.timer = None
            loop.call_soon(self._flush, session)

    async def call(self, packed: bytes) -> Any:
        """Send one packed command; return its reply (an error reply is returned too)."""
        return await self.send(packed)

    def _end(self, session: _Session, error: TransportError) -> None:
        """Fail what ``session`` owes; commands queued from now on go to a new one."""
        if self._session is session:
            self._session = None
        session.fail(error)

    async def _run(self, session: _Session) -> None:
        connection = self._make()
        protocol: _Replies | None = None
        error = TransportError("Redis connection closed")
        try:
            try:
                await connection.connect()  # type: ignore[no-untyped-call]
            except (rex.RedisError, OSError) as exc:
                raise fault(exc, "the connection set-up") from exc
            _raise_if_cancelled()
            self.connects += 1
            if self.connects > 1:
                telemetry.reconnecting("commands")
            protocol = _take_over(connection, functools.partial(self._replies, session))
            session.address = address_of(connection)
            session.stream = connection._writer.transport  # type: ignore[union-attr]
            if self._setup_timeout > self._timeout and self._session is session:
                self._progress = asyncio.get_running_loop().time()  # silent from now on
                self._rearm()
            if self._on_connect is not None and not session.last:
                self._on_connect()
            self._flush(session)  # what was queued while connecting
            if session.last and not session.pending:
                self._close_last(session)
            await protocol.lost  # raises what ended the connection
        except asyncio.CancelledError:
            if not (self._closed or session.timed_out):
                # Not ours: the event loop is shutting down (asyncio.run() cancels every
                # task), and a run cancelled with us still writes its terminal event. A
                # task made from now on would outlive the loop (pending, its socket left
                # open): each connection opened from now on closes once it owes nothing,
                # and its callers resume only once its task has ended.
                self._shutting_down = asyncio.get_running_loop()
            raise
        except Exception as exc:
            error = fault(exc, "the command")
        finally:
            self._end(session, error)
            try:
                await _discard(connection, protocol)
            finally:
                session.task = None
                session.hand_over()

    def _close_last(self, session: _Session) -> None:
        """A connection opened during the loop's shutdown owes nothing more: close it."""
        if self._session is session:
            self._session = None  # the next commands open another
        if session.stream is not None:
            session.stream.close()  # its task ends on connection_lost

    def _timed_out_write(self, loop: asyncio.AbstractEventLoop, session: _Session) -> None:
        """The write interval has passed: write two loop turns from now, so that the
        commands of what woke the loop with this timer go in this write too.

        The loop wakes for a timer together with other work (timers due in the same sleep,
        which asyncio's loop counts in whole milliseconds; sockets ready), and the tasks
        that work wakes run at the next turn, a callback each: written at once, their
        commands waited for the next write, an interval and often a whole millisecond
        later (issue 11: more than one paced token in ten).
        """
        session.timer = None
        loop.call_soon(loop.call_soon, self._flush, session)

    def _flush(self, session: _Session) -> None:
        # Everything queued during one event-loop turn goes out in one write, on the
        # connection's transport, without awaiting drain(): a task per flush
        # (send_packed_command) costs an event-loop turn per round trip. A broken socket
        # shows up on the reading side (connection_lost).
        session.flushing = False
        stream = session.stream
        if session.outgoing and stream is not None and not stream.is_closing():
            # (Closing: the connection is going; its commands fail with it.)
            batch, session.outgoing = session.outgoing, []
            stream.writelines(batch)
            session.flushed_at = asyncio.get_running_loop().time()

    def _replies(self, session: _Session, reader: hiredis.Reader) -> None:
        """Hand each reply parsed to what it is owed to, in order (one call per read from
        the socket, not per reply: the hot path of paced appends)."""
        pending = session.pending
        gets = reader.gets
        future = asyncio.Future
        answered = False
        try:
            while (reply := gets(False)) is not _INCOMPLETE:
                # An integer (an append's answer: the hot path) is neither a push nor an
                # error reply: two isinstance() calls fewer.
                other = type(reply) is not int
                if other and _PUSH is not None and isinstance(reply, _PUSH):
                    continue  # a RESP3 push (a server notification), not a command's reply
                if not pending:
                    raise TransportError(f"Redis sent a reply nobody asked for: {reply!r}")
                answered = True
                owed = pending.popleft()
                if session.last:
                    if session.hooks and session.hooks[0][0] is owed:
                        _call_hook(session.hooks.popleft()[1], reply)
                    session.answer(owed, reply)  # once the task has ended
                elif not isinstance(owed, future):  # posted
                    try:
                        owed(reply)
                    except Exception:  # a bug in the hook: not the connection's fault
                        logger.exception("Redis: a reply hook failed")
                else:
                    if not owed.done():  # done: its caller was cancelled; the reply is dropped
                        owed.set_result(reply)  # an error reply is returned too, as an exception
                    hooks = session.hooks
                    if hooks and hooks[0][0] is owed:
                        _call_hook(hooks.popleft()[1], reply)
                if (
                    other
                    and isinstance(reply, rex.RedisError)
                    and error_code(reply) in RECONNECT_CODES
                ):
                    # A demoted master (READONLY, or UNBLOCKED for a WAIT under way) or a
                    # server loading its data (redis-py makes that a ConnectionError): this
                    # connection points at the wrong server for now (issue 8, part 3).
                    raise TransportError(f"Redis answered {error_code(reply)}: reconnecting")
            if session.last and not pending:
                self._close_last(session)
        finally:
            if answered:
                self._progress = asyncio.get_running_loop().time()

    def _check(self) -> None:
        # One timer per connection, re-armed from the last progress (not one per command).
        self._watchdog = None
        session = self._session
        if session is None or not session.pending:
            return
        loop = asyncio.get_running_loop()
        connecting = session.stream is None
        limit = self._setup_timeout if connecting else self._timeout
        due = self._progress + limit
        if due - loop.time() > TIMER_SLACK:  # progress since it was armed
            self._watchdog = loop.call_at(due, self._check)
            return
        what = "connect" if connecting and limit > self._timeout else "answer"
        self._end(session, NoAnswer(f"Redis did not {what} within {limit:g} s"))
        if session.task is not None:
            session.timed_out = True
            session.task.cancel()

    def _rearm(self) -> None:
        """Have the watchdog look again ``timeout`` after the last progress."""
        loop = asyncio.get_running_loop()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog_loop = loop
        self._watchdog = loop.call_at(self._progress + self._timeout, self._check)

    def stopping(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether ``loop`` is shutting down (it cancelled this connection's task, as
        ``asyncio.run()`` does at its end): a task made now would outlive it."""
        return loop is self._shutting_down

    def restart(self) -> None:
        """The event loop it ran on is closed: forget its connection, whose task ended
        with that loop or never runs again (nothing of a closed loop can be touched). The
        next command connects again, on the running loop."""
        self._session = None
        self._tasks = set()
        self._watchdog = self._watchdog_loop = self._shutting_down = None

    @property
    def connected(self) -> bool:
        session = self._session
        return session is not None and session.address is not None

    def leave(self, address: tuple[str, int]) -> bool:
        """Close the connection if it is to a server other than ``address``: commands still
        owed fail with :class:`TransportError`, and the next ones open a new connection."""
        session = self._session
        if session is None or session.address is None or session.address == address:
            return False
        self._end(session, TransportError(f"Redis {session.address} is no longer the master"))
        if session.stream is not None:
            session.stream.close()  # its task ends on connection_lost
        return True

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with :class:`TransportClosed`."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._session is not None:
            self._end(self._session, TransportClosed("the Redis transport is closed"))
        await stop(*self._tasks)


class Subscriber:
    """One sharded pub/sub connection: ``SSUBSCRIBE`` per channel, kept across reconnects.

    ``on_message(channel, data)`` gets every message; ``on_subscribed(channel)`` runs each
    time Redis confirms a subscription (after a reconnection too: messages published
    meanwhile were lost, so look at the state again); ``on_moved(channel)`` runs when the
    channel's slot is served elsewhere now (Redis Cluster), the channel having been
    dropped here; ``on_fault()`` when the connection failed (the node may be gone).
    ``timeout``: seconds of silence before the server is sent a ``PING``, and before the
    connection is dropped if that brings no answer either (a hung server or host).
    """

    def __init__(
        self,
        make: ConnectionFactory,
        *,
        name: str,
        timeout: float,
        on_message: Callable[[bytes, bytes], None],
        on_subscribed: Callable[[bytes], None],
        on_moved: Callable[[bytes], None],
        on_fault: Callable[[], None],
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self._make = make
        self._on_connect = on_connect
        self._timeout = timeout
        self.name = name
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._on_moved = on_moved
        self._on_fault = on_fault
        self.channels: set[bytes] = set()  # wanted
        self.confirmed: set[bytes] = set()
        self._sent: set[bytes] = set()  # SSUBSCRIBE sent on the current connection
        # Changes not yet sent, kept as they come: comparing the whole sets on each change
        # cost O(channels) per stream started or ended (issue 11).
        self._to_subscribe: set[bytes] = set()
        self._to_unsubscribe: set[bytes] = set()
        # SUNSUBSCRIBEs sent and not yet confirmed, by channel: a confirmation nobody asked
        # for means Redis dropped the channel (its slot moved), one asked for does not,
        # even when the channel was followed again meanwhile.
        self._unsubscribing: collections.Counter[bytes] = collections.Counter()
        self._acked: set[bytes] = set()  # subscribed, as Redis confirmed
        self._changed = asyncio.Event()
        self._unsubscribe_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.connects = 0
        # Refusals with no other fault nor a confirmed subscription between them: a refusal
        # is not what a quick retry fixes (an operator changing the ACL or the password
        # does). Kept across runs of the task, which ends when no channel is left: each
        # new reading session is not news to log again, nor a reason to retry at once.
        self._refusals = 0
        # The server of the current connection and its socket, once connected.
        self._address: tuple[str, int] | None = None
        self._socket: asyncio.BaseTransport | None = None

    def restart(self) -> None:
        """The event loop it ran on is closed: forget its connection and what it followed
        (the readers and runs of that loop are gone with it; as :meth:`Pipe.restart`).
        The next :meth:`add` connects again, on the running loop."""
        self._task = None
        self._changed = asyncio.Event()
        self._unsubscribe_timer = None
        self._address = self._socket = None
        self.channels.clear()
        self.confirmed.clear()
        self._sent = set()
        self._to_subscribe = set()
        self._to_unsubscribe = set()
        self._unsubscribing.clear()
        self._acked.clear()

    @property
    def connected(self) -> bool:
        return self._address is not None

    def leave(self, address: tuple[str, int]) -> bool:
        """Reconnect if connected to a server other than ``address`` (as :meth:`Pipe.leave`)."""
        if self._socket is None or self._address is None or self._address == address:
            return False
        self._socket.close()  # `lost` fails: the connection is made again
        return True

    def add(self, channel: bytes) -> None:
        if self._closed:
            raise TransportClosed("the Redis transport is closed")
        if channel in self.channels:
            return
        self.channels.add(channel)
        self._to_unsubscribe.discard(channel)
        if channel not in self._sent:
            self._to_subscribe.add(channel)
        elif channel in self._acked:
            self.confirmed.add(channel)  # left and followed again before it was sent
        self._poke()

    def remove(self, channel: bytes) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self.confirmed.discard(channel)
            self._to_subscribe.discard(channel)
            if channel in self._sent and channel not in self._to_unsubscribe:
                self._to_unsubscribe.add(channel)
                if self._unsubscribe_timer is None:
                    loop = asyncio.get_running_loop()
                    self._unsubscribe_timer = loop.call_later(UNSUBSCRIBE_DELAY, self._poke)

    def _poke(self) -> None:
        if self._closed:
            return
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"rstream redis {self.name}")

    async def _run(self) -> None:
        while not self._closed:
            if not self.channels:
                self._task = None  # nothing to follow: no connection (add() starts again)
                return
            connection = self._make()
            protocol: _Replies | None = None
            self._sent = set()
            self._to_subscribe = set(self.channels)
            self._to_unsubscribe = set()
            self._unsubscribing.clear()
            self._acked.clear()
            set_up = False
            try:
                try:
                    try:
                        await connection.connect()  # type: ignore[no-untyped-call]
                    except (rex.RedisError, OSError) as exc:
                        raise fault(exc, "the notices connection's set-up") from exc
                    set_up = True
                    _raise_if_cancelled()
                    self.connects += 1
                    if self.connects > 1:  # made again (not each failed attempt)
                        telemetry.reconnecting("notices")
                    protocol = _take_over(connection, _each(self._message))
                    self._address = address_of(connection)
                    self._socket = protocol.transport
                    if self._on_connect is not None:
                        self._on_connect()
                    writer = asyncio.create_task(
                        self._write(protocol.transport), name=f"{self.name} writer"
                    )
                    keeper = asyncio.create_task(
                        protocol.keep_alive(self._timeout), name=f"{self.name} keep-alive"
                    )
                    try:
                        await protocol.lost  # raises what ended the connection
                    finally:
                        await stop(writer, keeper)
                except Exception as exc:  # redis-py's, the socket's, or a bug's: one type
                    raise fault(exc, "the notices connection") from exc
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, BackendRefused):
                    self._refusals += 1
                    if self._refusals == 1:
                        # Refused at the set-up (AUTH or HELLO: a password changed, a
                        # user disabled), or by SSUBSCRIBE (no channels, no command).
                        logger.error(
                            "%s: %s; live readers read each stream again every half lease "
                            "instead of being woken, until Redis %s; retrying with backoff",
                            self.name,
                            exc,
                            "lets this user SSUBSCRIBE to the streams' channels (ACL: &<prefix>:*)"
                            if set_up
                            else "accepts the connection's credentials and set-up",
                        )
                else:
                    self._refusals = 0
                    logger.warning("%s: %s; reconnecting", self.name, exc)
                self._on_fault()
            finally:
                self._address = self._socket = None
                # What the dead connection had subscribed is gone with it.
                self.confirmed.clear()
                self._acked.clear()
                self._sent = set()
                await _discard(connection, protocol)
            if not self._closed:
                # backoff before reconnecting
                await asyncio.sleep(refused_delay(self._refusals))

    async def _write(self, transport: asyncio.WriteTransport) -> None:
        changed = self._changed
        while True:
            changed.clear()
            if self._unsubscribe_timer is not None:
                self._unsubscribe_timer.cancel()  # the SUNSUBSCRIBEs go now
                self._unsubscribe_timer = None
            adding, self._to_subscribe = self._to_subscribe, set()
            dropping, self._to_unsubscribe = self._to_unsubscribe, set()
            self._sent |= adding
            self._sent -= dropping
            commands = [pack("SSUBSCRIBE", c) for c in adding]
            commands += [pack("SUNSUBSCRIBE", c) for c in dropping]
            self._unsubscribing.update(dropping)
            if commands and not transport.is_closing():
                transport.writelines(commands)  # a broken socket shows up in `lost`
            await changed.wait()

    def _message(self, message: Any) -> None:
        """One message or reply of the subscriber connection, as it arrives."""
        if isinstance(message, rex.RedisError):
            if error_code(message) == "MOVED" and isinstance(message, rex.AskError):
                # SSUBSCRIBE or SUNSUBSCRIBE of a channel whose slot lives elsewhere: Redis
                # did not run it, and will not confirm it.
                slot = message.slot_id
                for channel in [c for c in self._unsubscribing if _slot_of(c) == slot]:
                    del self._unsubscribing[channel]
                for channel in [c for c in self._sent if _slot_of(c) == slot]:
                    self._lose(channel)
                return
            raise message  # the connection is dropped and made again
        if not isinstance(message, list) or len(message) < 3:
            return
        kind, channel = message[0], message[1]
        if kind == b"smessage":
            self._on_message(channel, message[2])
        elif kind == b"ssubscribe":
            self._refusals = 0  # allowed (again): a later refusal is news
            self._acked.add(channel)
            if channel in self.channels:
                self.confirmed.add(channel)
                self._on_subscribed(channel)
        elif kind == b"sunsubscribe":
            self._acked.discard(channel)
            if self._unsubscribing[channel] > 0:
                self._unsubscribing[channel] -= 1  # ours
                if not self._unsubscribing[channel]:
                    del self._unsubscribing[channel]
            elif channel in self._sent:
                # Not asked for: Redis dropped the channel because its slot moved away.
                self._lose(channel)

    def _lose(self, channel: bytes) -> None:
        self._sent.discard(channel)
        self._to_unsubscribe.discard(channel)
        self._acked.discard(channel)
        self.confirmed.discard(channel)
        if channel in self.channels:
            self.channels.discard(channel)
            self._on_moved(channel)

    async def aclose(self) -> None:
        self._closed = True
        if self._unsubscribe_timer is not None:
            self._unsubscribe_timer.cancel()
            self._unsubscribe_timer = None
        if self._task is not None:
            await stop(self._task)


def address_of(connection: AbstractConnection) -> tuple[str, int] | None:
    """The (host, port) of a TCP connection (a Sentinel-managed one sets them as it connects)."""
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return (host, port) if isinstance(host, str) and isinstance(port, int) else None


def _raise_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop while it connected and the
    request was lost in redis-py's connect (its timeout and retry, on Python 3.11: see
    :func:`stop`). The task would carry on, connected and waiting on its socket, and
    ``asyncio.run()``, which cancels every task once as the loop ends, would wait for it
    for good."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they have ended.

    Code inside redis-py (or asyncio's own ``wait_for`` on Python 3.11) may swallow the
    CancelledError thrown into a task, which then carries on; so cancel again until it
    has really ended.
    """
    waiting = {task for task in tasks if not task.done()}
    interrupted = False
    while waiting:
        for task in waiting:
            task.cancel()
        try:
            _, waiting = await asyncio.wait(waiting, timeout=0.1)
        except asyncio.CancelledError:
            # Our caller is being cancelled too: finish stopping the tasks first, so none
            # is left running without an owner (or failing with nobody to see it).
            interrupted = True
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a failure at shutdown is not worth a warning
    if interrupted:
        raise asyncio.CancelledError


async def to_the_end(*steps: Callable[[], Awaitable[Any]]) -> None:
    """Await each of ``steps`` in turn, all of them even if cancelled meanwhile; then pass
    the cancellation on (a close cut short left connections open for good: closing again
    does nothing)."""
    interrupted = False
    for step in steps:
        try:
            await step()
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError


def _slot_of(channel: bytes) -> int:
    from redis.crc import key_slot

    return int(key_slot(channel))
