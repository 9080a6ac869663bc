"""The guest agent reached through libvirt's own API (``virDomainQemuAgentCommand``).

libvirt connects to a domain's ``org.qemu.guest_agent.0`` channel itself
(it is "the guest agent" to libvirt), so under the libvirt backend the
plant cannot read that stream: it hands libvirt one command and gets back
the text of one answer. :class:`LibvirtAgentTransport` keeps the rules of
:mod:`.transport` on that path; what libvirt 9.0 does itself, measured
against qemu-ga 7.2 in the tiny image (see ``docs/guest-image.md``):

- **Resynchronisation (rule 4) is libvirt's.** Before the first command on
  a fresh agent connection, and after any command libvirt gave up on,
  libvirt sends ``guest-sync`` with an id of its own and drops every answer
  until that id comes back (garbage during the first sync is tolerated
  once); a late answer with no command waiting is dropped. So a stale
  answer is never taken for the next one, and this transport sends no sync
  of its own. It must never send ``guest-sync-delimited`` either: its
  answer starts with a 0xFF byte, which libvirt cannot parse, and libvirt
  then refuses the guest's agent for good (below). It is refused here.
- **libvirt's sync has its own timeout:** 5 s (or the domain's agent
  response timeout if shorter), whatever the command's timeout, so one
  libvirt call can last that much longer than asked. Rule 1 is kept by
  running each call on a worker thread: the caller waits for it only until
  its own deadline (then :class:`AgentTimeout`); the worker holds the
  guest's lock until libvirt returns (its own timeouts, and the
  connection's keepalive, bound that), so commands to one guest never
  overlap and a later command waits, within its own deadline, for libvirt
  to be done with the earlier one (rule 5).
- **Sizes (rule 2).** libvirt reads at most 10 MiB of an answer; anything
  longer, or any line it cannot parse, puts libvirt's connection to that
  guest's agent into an error state that lasts until the guest closes and
  reopens its end of the channel (a restarted qemu-ga does): every command
  then fails at once with "QEMU guest agent is not available due to an
  error". That hurts only this guest's own actions (each gets an
  :class:`AgentError` saying so), never another domain or the plant. An
  answer over 4 MiB (libvirt's RPC string limit) fails that one command
  ("Unable to encode message payload") and the agent stays usable. What
  does arrive (at most 4 MiB of text) is refused unparsed above
  :data:`~.transport.MAX_ANSWER_BYTES` and otherwise parsed by the same
  strict :func:`~.transport.parse_answer` as the socket transport's.
- **Errors (rule 3).** libvirt turns an ``{"error": ...}`` answer into its
  own error ("unable to execute QEMU agent command 'X': DESC"), keeping the
  agent's description but not its class: that becomes an
  :class:`AgentCommandError` with class ``GenericError`` (qemu-ga 7.2's
  class for every failure of a known command). Every other failure, a
  libvirt error, a dead connection, or text that is not UTF-8 (libvirt
  passes a guest's bytes on unchecked, and its Python bindings then raise
  ``SystemError``), becomes an :class:`AgentError`, with libvirt's words
  cut to a few hundred printable characters: they may quote the guest.
- **A guest that breaks the protocol is not talked to again.** libvirtd
  logs each line it cannot parse *in full* ("cannot parse json <line>",
  up to 10 MiB, at error level in its own log, which libvirt does not
  rotate), and a guest can reset libvirt's error state whenever it likes
  by reopening its channel. So after the first such failure (the error
  state, a line libvirt could not parse, an answer that is not UTF-8) this
  transport refuses every later command itself, at once, without asking
  libvirt: a hostile guest gets at most one line into libvirtd's log per
  plant process (a new transport, made when the plant restarts and adopts
  the VM, tries again). A well-behaved qemu-ga never sends such a thing:
  the plant caps every output far below the limits inside the guest.
- **Readiness.** Before the guest's qemu-ga has opened its end, libvirt
  fails a command at once ("QEMU guest agent is not connected"), and logs
  each such failure in libvirtd's log. So while the agent has not answered
  yet (and after any failure), the transport first asks libvirt whether the
  channel is connected (``channel_connected``, the domain XML's channel
  ``state``), which costs no log line, and fails fast if not;
  :meth:`~vmplant_service.channel.Channel.wait_agent` retries.

Each transport uses a libvirt connection of its own (made by ``connect``,
which returns the domain on it), so a guest whose agent keeps libvirt busy
fills no other guest's share of the daemon's per-client request limit
(``max_client_requests``, 5 by default).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .transport import (
    MAX_ANSWER_BYTES,
    MAX_ERROR_CHARS,
    AgentCommandError,
    AgentError,
    AgentTimeout,
    AgentTransport,
    encode_command,
    parse_answer,
)

log = logging.getLogger(__name__)

# libvirt's virErrorNumber values (virterror.h) that this module tells apart; no bindings needed.
VIR_ERR_INTERNAL_ERROR = 1
VIR_ERR_NO_CONNECT = 5
VIR_ERR_SYSTEM_ERROR = 38
VIR_ERR_RPC = 39
VIR_ERR_NO_DOMAIN = 42
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_AGENT_UNRESPONSIVE = 86
VIR_ERR_AGENT_UNSYNCED = 97
#: libvirt's smallest timeout that still waits (seconds; 0 means "do not wait", negatives block).
MIN_LIBVIRT_SECONDS = 1
#: Commands never sent through libvirt: their answer would put libvirt's agent connection in its error state.
REFUSED = frozenset({"guest-sync-delimited"})
#: The error class given to an agent's ``{"error": ...}`` answer (libvirt keeps only the description).
ERROR_CLASS = "GenericError"
COMMAND_FAILED = "unable to execute QEMU agent command '"

#: ``agent_command(domain, json_text, seconds)``: libvirt's answer text (``libvirt_qemu.qemuAgentCommand``).
AgentCall = Callable[[Any, str, int], str]


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _code(exc: BaseException) -> int | None:
    getter = getattr(exc, "get_error_code", None)
    try:
        code = getter() if callable(getter) else None
    except Exception:  # noqa: BLE001 - a broken error object is just an unknown error
        return None
    return code if isinstance(code, int) else None


def _words(exc: BaseException) -> str:
    """libvirt's message for ``exc``, printable and cut (it may quote what the guest sent)."""
    getter = getattr(exc, "get_error_message", None)
    try:
        message = getter() if callable(getter) else None
    except Exception:  # noqa: BLE001
        message = None
    try:
        text = str(message or exc)
    except Exception:  # noqa: BLE001 - e.g. a message that cannot be decoded
        text = type(exc).__name__
    return _printable(text.strip())[:MAX_ERROR_CHARS]


def _detached(exc: AgentError) -> AgentError:
    """``exc`` without its traceback and context: they hold this thread's frames, and with them the libvirt
    domain (and so its connection, which the daemon counts as a client) until the garbage collector's next
    full pass."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


@dataclass
class _Call:
    """One command on its way through libvirt: the worker fills it in, the caller waits for ``done``."""

    name: str
    text: str
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: AgentError | None = None


class LibvirtAgentTransport(AgentTransport):
    """One guest's agent through libvirt (see the module docstring for how the rules are kept).

    ``connect()`` opens a libvirt connection of this transport's own and
    returns the guest's domain on it (raising anything on failure: it
    becomes an AgentError); ``agent_command`` sends one command
    (``libvirt_qemu.qemuAgentCommand``); ``channel_connected(domain)`` says
    whether the guest has opened its end of the agent's channel (None: not
    known). ``clock`` is monotonic seconds.
    """

    def __init__(self, label: str, connect: Callable[[], Any], agent_command: AgentCall,
                 channel_connected: Callable[[Any], bool | None] = lambda domain: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self._connect = connect
        self._agent_command = agent_command
        self._channel_connected = channel_connected
        self._clock = clock
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._domain: Any = None
        self._answered = False  # the agent answered the last command: no readiness check before the next
        self._call: _Call | None = None
        self._drop_after = False  # close() came while a command was in libvirt: its worker drops the connection
        self._broken: str | None = None  # why the guest's agent is not talked to any more (see the module docstring)

    def command(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        deadline = self._clock() + timeout
        if name in REFUSED:
            raise AgentError(f"{name} is not sent through libvirt (libvirt cannot parse its 0xFF delimiter "
                             "and would stop talking to the agent); libvirt synchronises by itself")
        if self._broken is not None:
            raise AgentError(f"{name}: {self._broken}")
        text = encode_command(name, arguments).decode().rstrip("\n")
        if not self._lock.acquire(timeout=max(timeout, 0.0)):
            raise AgentTimeout(f"{name}: libvirt was still busy with an earlier command to this guest's agent "
                               f"after {timeout:g} s")
        call = _Call(name, text, deadline)
        try:
            with self._state_lock:
                self._call = call
            threading.Thread(target=self._work, args=(call,), daemon=True,
                             name=f"libvirt-agent-{self.label}").start()
        except BaseException:
            self._lock.release()
            raise
        # The worker releases the lock once libvirt has returned, however long after our deadline that is.
        if not call.done.wait(max(deadline - self._clock(), 0.0)):
            raise AgentTimeout(f"{name}: no answer from the guest's agent within {timeout:g} s")
        if call.error is not None:
            raise call.error
        return call.value

    def close(self) -> None:
        """Drop the connection: a command in progress ends at once with an AgentError; a later one reconnects."""
        with self._state_lock:
            call = self._call
        if call is not None and not call.done.is_set():
            call.error = AgentError(f"{call.name}: the agent's connection was closed")
            call.done.set()
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._lock.release()
        else:
            self._drop_after = True

    # The worker -----------------------------------------------------------------------
    def _work(self, call: _Call) -> None:
        try:
            try:
                call.value = self._exchange(call)
            except AgentError as exc:
                if call.error is None:
                    call.error = _detached(exc)
            except Exception as exc:  # noqa: BLE001 - rule 3: nothing but AgentError reaches the caller
                if call.error is None:
                    call.error = AgentError(f"{call.name}: {type(exc).__name__}: {_words(exc)}")
            call.done.set()
        finally:
            if self._drop_after:
                self._drop_after = False
                self._drop()
            with self._state_lock:
                if self._call is call:
                    self._call = None
            self._lock.release()

    def _exchange(self, call: _Call) -> Any:
        domain = self._domain_or_connect(call.name)
        if not self._answered and self._channel_connected(domain) is False:
            raise AgentError(f"{call.name}: the guest's agent has not opened its channel (not started yet, "
                             "or gone)")
        left = call.deadline - self._clock()
        if left <= 0:
            raise AgentTimeout(f"{call.name}: no time left")
        # libvirt counts whole seconds; the caller stops waiting at its own deadline anyway.
        seconds = max(MIN_LIBVIRT_SECONDS, math.ceil(left))
        try:
            answer = self._agent_command(domain, call.text, seconds)
        except AgentError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted out below; never another exception type
            failure = self._translate(call.name, exc)
            self._answered = isinstance(failure, AgentCommandError)  # the agent did answer, with an error
            raise failure from None
        self._answered = True
        if not isinstance(answer, str):
            raise AgentError(f"{call.name}: libvirt returned no answer text")
        if len(answer) > MAX_ANSWER_BYTES:
            raise AgentError(f"{call.name}: the answer is larger than {MAX_ANSWER_BYTES} bytes")
        try:
            data = answer.encode("utf-8")
        except UnicodeEncodeError:
            raise AgentError(f"{call.name}: the answer is not valid UTF-8") from None
        return parse_answer(data, call.name)

    def _translate(self, name: str, exc: Exception) -> AgentError:
        """A libvirt failure (or a failure to decode what libvirt passed on) as an AgentError."""
        failure = self._classify(name, exc)
        if self._broken is None and self._protocol_broken(exc):
            self._broken = ("the plant no longer sends commands to this guest's agent: it broke the agent protocol "
                            f"({str(failure).split(': ', 1)[-1][:200]})")
            log.warning("VM %s: %s", self.label, self._broken)
        return failure

    @staticmethod
    def _protocol_broken(exc: Exception) -> bool:
        """Whether ``exc`` says the guest sent libvirt something no qemu-ga sends (see the module docstring)."""
        code = _code(exc)
        if code is None:
            return isinstance(exc, (SystemError, UnicodeError))
        words = _words(exc)
        return ((code == VIR_ERR_AGENT_UNRESPONSIVE and "due to an error" in words)
                or (code == VIR_ERR_SYSTEM_ERROR and "No complete agent response" in words)
                or (code == VIR_ERR_INTERNAL_ERROR and any(
                    text in words for text in ("cannot parse json", "Unknown JSON reply", "isn't an object"))))

    def _classify(self, name: str, exc: Exception) -> AgentError:
        code = _code(exc)
        words = _words(exc)
        if code is None:
            if isinstance(exc, (SystemError, UnicodeError)):
                return AgentError(f"{name}: libvirt passed on an answer or error from the guest that is not "
                                  "valid UTF-8")
            return AgentError(f"{name}: {type(exc).__name__}: {words}")
        if code == VIR_ERR_INTERNAL_ERROR and COMMAND_FAILED + name + "'" in words:
            description = words.split(COMMAND_FAILED + name + "'", 1)[1].lstrip(": ")
            return AgentCommandError(name, ERROR_CLASS, description)
        if code == VIR_ERR_AGENT_UNRESPONSIVE:
            if "due to an error" in words:
                return AgentError(f"{name}: libvirt has stopped talking to this guest's agent after a protocol "
                                  "error (an answer libvirt could not read, or one over its 10 MiB limit)")
            if "not available for now" in words:
                return AgentTimeout(f"{name}: the guest's agent did not answer in time (libvirt: {words})")
            if "not connected" in words:
                return AgentError(f"{name}: the guest's agent is not connected")
            return AgentError(f"{name}: the guest's agent is gone ({words})")
        if code == VIR_ERR_SYSTEM_ERROR and "No complete agent response" in words:
            return AgentError(f"{name}: the guest's agent sent an answer over libvirt's 10 MiB limit")
        if code == VIR_ERR_RPC and "encode message payload" in words:
            return AgentError(f"{name}: the guest's answer is larger than libvirt passes on (4 MiB)")
        if code in (VIR_ERR_NO_DOMAIN, VIR_ERR_OPERATION_INVALID):
            self._forget_domain()
            return AgentError(f"{name}: the guest is not running ({words})")
        # Anything else may be a dead connection: check, and reconnect next time if it is.
        self._forget_domain_if_dead()
        return AgentError(f"{name}: libvirt: {words}")

    # The connection ---------------------------------------------------------------------
    def _domain_or_connect(self, name: str) -> Any:
        if self._domain is None:
            try:
                self._domain = self._connect()
            except AgentError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise AgentError(f"{name}: cannot reach the guest through libvirt: {_words(exc)}") from None
            self._answered = False
        return self._domain

    def _forget_domain(self) -> None:
        self._answered = False
        self._drop()

    def _forget_domain_if_dead(self) -> None:
        domain = self._domain
        if domain is None:
            return
        try:
            alive = bool(domain.connect().isAlive())
        except Exception:  # noqa: BLE001
            alive = False
        if not alive:
            self._forget_domain()

    def _drop(self) -> None:
        domain, self._domain = self._domain, None
        self._answered = False
        if domain is None:
            return
        try:
            domain.connect().close()
        except Exception as exc:  # noqa: BLE001 - closing a dead connection may fail; nothing to do then
            log.debug("closing the agent's libvirt connection of %s: %s", self.label, exc)


__all__ = ["REFUSED", "LibvirtAgentTransport"]
