"""The per-VM relay of the UML backend: UML's parent, its agent's socket and its console's keeper.

UML has no virtio-serial and no chardev server: its serial lines are host
file descriptors. If the plant held them, a plant restart would close the
guest agent's line for good (UML hangs the line up, qemu-ga exits and finds
no line again) and stop the console's reader. So each VM gets a small
daemon of its own, this relay, which lives exactly as long as the VM:

- it **starts UML** (through :mod:`.launcher`, which jails it and drops it
  to the hypervisor user) as its own child, so it alone learns UML's exit
  status, and records it in ``uml.exit`` (``{"pid", "exitcode"}`` or
  ``{"pid", "signal"}``); before it reaps UML it kills UML's process group
  (UML makes itself a session and group leader: an unclean end leaves the
  host processes of the guest's processes behind, some busy); UML gets the
  parent-death signal SIGKILL, so it never outlives its relay;
- it holds the host end of the **agent's line** (a socketpair whose other
  end is UML's ``ssl0=fd:N``, the guest's ``/dev/ttyS0``, where qemu-ga runs
  in isa-serial mode) and serves it on the unix socket ``qga.sock`` in the
  VM's run directory (0600, in the plant's 0700 directory, outside UML's
  jail): **one client at a time**, as QEMU's ``-chardev socket,server=on``
  does (a second client's ``connect`` succeeds and waits, unanswered, until
  the first one closes), so the plant's
  :class:`~vmplant_service.agent.transport.SocketTransport` speaks to UML
  and QEMU alike, and a restarted plant simply connects again;
- it holds the host end of the **console** (``con0=fd:M``, a second
  socketpair) and UML's own standard output and error (a pipe, which the
  plugs' standard error shares), and appends both to ``console.log``, renamed to ``console.log.1`` at ``console_limit``
  bytes, so a guest's console never holds more than twice that of the host's
  disk (as :class:`~vmplant_service.backends.console.ConsoleKeeper` does for
  QEMU);
- it starts the ``vde_plug`` of each segment NIC **outside the jail**: a
  ``SOCK_SEQPACKET`` socketpair whose one end UML's NIC uses
  (``ethN=vde,seqpacket://FD``) and whose other end ``vde_plug`` joins to
  the owner's switch, so the jail needs no switch directory; each plug gets
  the parent-death signal and a pidfile (``nicN.plug.pid``), and its
  description names the run directory (the marker the backend checks).

**Bounds.** Every buffer is bounded: at most :data:`BUFFER` bytes wait in
each direction between the agent and its client; when a buffer is full the
relay stops reading that side (the writer waits, as on any full socket).
While no client is connected, whatever the guest writes on the agent's line
is read and **dropped** (QEMU's chardev drops it too); a client that
connects resynchronises (the transport's ``guest-sync-delimited``), so a
half answer left from before is never taken for the next one. The console
is read as fast as UML writes it and is bounded by its rotation. Nothing the
guest sends is ever a name or a path to the relay: bytes are passed on or
written to files the backend named.

**The line's own limit.** UML's serial line is a tty: once 4 KiB wait
unread in the guest's tty buffer, the tty throttles the line, and UML 6.1
(``line_throttle``/``line_unthrottle`` in ``arch/um/drivers/line.c``) never
turns its host descriptor's interrupt back on: the agent's line is dead for
good (measured: one request of ~4-8 KB does it). So the relay hands UML at
most :data:`LINE_WRITE` bytes at a time, and only once UML has read
everything it was given before (``SIOCOUTQ`` of the socketpair is 0; while
the guest has not opened the line yet, nothing more is pushed), and drops
what a departed client sent but UML was not given: stale readiness probes
cannot pile up on a line that opens late. UML reads its line only when new
input arrives, so input that was waiting when the guest opened the line
would wait on (measured: 2-4 s more to agent-ready); while a client waits
and UML leaves bytes unread, the relay adds a newline every
:data:`POKE_EVERY` seconds (JSON whitespace, which qemu-ga skips without an
answer; only between requests, at most :data:`POKE_LIMIT` in a row). The other half, keeping each
request small, is the backend's transport's
(:class:`~vmplant_service.backends.uml.agent.SerialLineTransport`).

**Isolation choice.** The relay runs as ``python3 -I -S relay.py RUN_DIR/``
with the standard library only: ``-I`` ignores the environment (no
``PYTHON*`` variables, no user site, not even its own directory on
``sys.path``) and ``-S`` loads no site packages, so no code but the
standard library's and this file's runs next to the guest's bytes, and the
plant's virtualenv can change under a running relay without touching it
(it is not imported by the plant while it runs; the plant imports it only
for its tests and constants). It stays single-threaded (a ``poll`` loop),
because the parent-death signal is bound to the thread that forked UML.
It keeps the plant's user (root, for the jail's mounts and to write the
plant's 0700 run directory); it only moves bytes between descriptors.

The plant starts it with its configuration (JSON) on standard input; the
first process forks the daemon (a session of its own) and prints one JSON
line, ``{"ok": true, "relay": PID, "uml": PID}`` once UML has run for
``settle`` seconds, or ``{"ok": false, "error": ...}`` (the launcher's
message, or UML's last words with its exit status), then exits.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
import time
from typing import Any

#: Bytes that may wait in each direction between the agent's line and its client.
BUFFER = 64 * 1024
#: The most bytes handed to UML's end of the agent's line at once, and only when UML has read all before.
LINE_WRITE = 2048
#: Seconds between two looks at whether UML has read what it was given (no event tells).
LINE_POLL = 0.01
#: While UML leaves what it was given unread for this long, a newline (JSON whitespace: qemu-ga skips it
#: without an answer) is added, and again as often, at most POKE_LIMIT of them in a row: UML reads a line
#: on new input only, so bytes that arrived before the guest opened the line would otherwise wait
#: (measured: 2-4 s) for something else.
POKE_EVERY = 0.25
POKE_LIMIT = 512
READ_CHUNK = 65536
#: Bytes of UML's last output kept for an error message.
TAIL = 2000
#: Seconds the relay keeps reading the console after UML exited (its children may still hold the line).
DRAIN = 2.0
#: Seconds between two looks for ended children when no signal woke the loop.
TICK = 0.5
#: Descriptors the relay's own ends are moved to (above any number a child gets).
HIGH_FD = 64
PR_SET_PDEATHSIG = 1


def unread(sock: socket.socket) -> int:
    """What ``sock`` holds that its peer has not read yet: SIOCOUTQ of a unix socket, the memory charged to
    the sender until the reader consumes it (so 0 when all was read; not a byte count)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def write_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (0600) by renaming a fresh file over it: readers never see half of it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def printable(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in text).strip()


class ConsoleLog:
    """``path`` holding at most ``limit`` bytes; the older part is ``path.1`` (one generation)."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = max(limit, 1)
        self.fd = -1
        self.written = 0
        self.tail = b""

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        self.written = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-TAIL:]
        while data:
            if self.fd < 0:
                try:
                    self._open()
                except OSError:
                    return  # nowhere to write: the bytes are dropped, never buffered
            room = self.limit - self.written
            if room <= 0:
                os.close(self.fd)
                self.fd = -1
                try:
                    os.replace(self.path, self.path + ".1")
                except OSError:
                    pass
                continue
            part, data = data[:room], data[room:]
            try:
                os.write(self.fd, part)
            except OSError:
                return
            self.written += len(part)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def high(fd: int) -> int:
    """``fd`` moved to a number >= HIGH_FD (close-on-exec; the old number is closed), so that it is never
    one of the numbers a child gets its descriptors at."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    os.close(fd)
    return moved


def spawn(argv: list[str], fds: dict[int, int], stdout: int, stderr: int, env: dict[str, str]) -> int:
    """Start ``argv`` as a child with ``fds`` (number in the child -> descriptor here) and the parent-death
    signal SIGKILL; its pid. OSError (with the reason) if it could not be executed."""
    error_r, error_w = os.pipe()  # close-on-exec: empty at EOF if the exec worked
    pid = os.fork()
    if pid == 0:  # the child: only async-signal-safe work until the exec
        try:
            os.close(error_r)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            for number in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(number, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            for target, source in fds.items():
                os.dup2(source, target)  # dup2 clears close-on-exec on the target
            os.execve(argv[0], argv, env)
        except BaseException as exc:  # noqa: BLE001 - anything: report it, never return into the relay
            try:
                os.write(error_w, f"{argv[0]}: {exc}".encode()[:1000])
            finally:
                os._exit(127)
    os.close(error_w)
    try:
        message = b""
        while True:
            chunk = os.read(error_r, 1000)
            if not chunk:
                break
            message += chunk
    finally:
        os.close(error_r)
    if message:
        os.waitpid(pid, 0)
        raise OSError(message.decode(errors="replace"))
    return pid


class Relay:
    """One VM's relay (see the module docstring). ``serve()`` returns when UML has ended."""

    def __init__(self, config: dict[str, Any], report_fd: int) -> None:
        self.config = config
        self.run_dir: str = config["run_dir"]
        self.report_fd = report_fd
        self.reported = False
        self.console = ConsoleLog(self.path("console.log"), int(config["console_limit"]))
        self.listener: socket.socket | None = None
        self.client: socket.socket | None = None
        self.agent: socket.socket | None = None
        self.console_end: socket.socket | None = None
        self.output = -1
        self.status = -1
        self.status_message = b""
        self.to_agent = bytearray()
        self.to_client = bytearray()
        self.at_boundary = True  # the last byte handed to UML ended a request (or none was)
        self.poked = 0.0
        self.handed = 0.0  # when bytes were last handed to UML
        self.pokes = 0  # newlines added since UML last read everything
        self.uml_pid = 0
        self.plugs: dict[int, int] = {}  # pid -> NIC index
        self.exit: dict[str, int] | None = None
        self.started = time.monotonic()
        self.deadline = self.started + float(config["timeout"])
        self.settled_at: float | None = None
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    # Start-up ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        config = self.config
        write_file(self.path("relay.pid"), f"{os.getpid()}\n")
        signal.set_wakeup_fd(self.wake_w)
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, self._on_signal)
        socket_path = self.path("qga.sock")
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        os.chmod(socket_path, 0o600)
        self.listener.listen(1)
        self.listener.setblocking(False)
        agent_host, agent_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        console_host, console_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (agent_host, console_host):
            end.setblocking(False)
        self.agent, self.console_end = agent_host, console_host
        output_r, output_w = os.pipe()
        status_r, status_w = os.pipe()
        self.output, self.status = high(output_r), high(status_r)
        os.set_blocking(self.output, False)
        fds = config["fds"]
        child_fds = {int(fds["status"]): high(status_w), int(fds["agent"]): high(agent_guest.detach()),
                     int(fds["console"]): high(console_guest.detach())}
        output_w = high(output_w)
        null = high(os.open(os.devnull, os.O_WRONLY))
        for nic in config["nics"]:
            plug_end, uml_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            child_fds[int(nic["fd"])] = high(uml_end.detach())
            plug = high(plug_end.detach())
            try:
                argv = [nic["plug"], "--descr", f"vmshop-uml {self.run_dir}/ nic{nic['index']}",
                        f"seqpacket://{nic['fd']}", f"vde://{nic['switch']}"]
                # Its complaints go to the console log (bounded), like UML's own.
                pid = spawn(argv, {int(nic["fd"]): plug}, null, output_w, {"PATH": "/usr/bin:/bin"})
            finally:
                os.close(plug)
            self.plugs[pid] = int(nic["index"])
            write_file(self.path(f"nic{nic['index']}.plug.pid"), f"{pid}\n")
        launch = dict(config["launch"], parent=os.getpid())
        argv = [config["python"], "-I", "-S", config["launcher"], json.dumps(launch), *config["uml"]]
        try:
            self.uml_pid = spawn(argv, child_fds, output_w, output_w, {})
        finally:
            for fd in [*child_fds.values(), output_w, null]:
                os.close(fd)
        write_file(self.path("uml.pid"), f"{self.uml_pid}\n")

    def report(self, ok: bool, error: str = "") -> None:
        if self.reported:
            return
        self.reported = True
        message: dict[str, Any] = {"ok": ok, "relay": os.getpid(), "uml": self.uml_pid}
        if not ok:
            message["error"] = error
            message["exit"] = self.exit
        try:
            os.write(self.report_fd, (json.dumps(message) + "\n").encode())
            os.close(self.report_fd)
        except OSError:
            pass

    # The loop -------------------------------------------------------------------------------------
    def _on_signal(self, number: int, frame: object) -> None:
        if number != signal.SIGCHLD:
            self.stopping = True

    def serve(self) -> None:
        try:
            self.prepare()
        except OSError as exc:
            self.report(False, f"the relay could not start UML: {exc}")
            self.stop_children()
            return
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            self.reap()
            if self.stopping and self.exit is None:
                self.kill_uml()
            if self.exit is not None:
                if drain_until is None:
                    drain_until = now + DRAIN
                    self.drop_client()
                    while self.status >= 0:  # the launcher's last words, if it failed (its end is closed now)
                        self.on_status(select.POLLIN)
                    self.report(False, printable(self.status_message)[:1000] or self.ended_words())
                if now > drain_until or (self.console_end is None and self.output < 0):
                    break
            elif not self.reported:
                if self.status < 0 and self.status_message:
                    self.report(False, printable(self.status_message)[:1000])
                    self.kill_uml()
                elif self.status < 0 and self.settled_at is None:
                    self.settled_at = now + float(self.config["settle"])
                elif self.settled_at is not None and now >= self.settled_at:
                    self.report(True)
                elif now > self.deadline:
                    self.report(False, f"UML did not start within {self.config['timeout']} s")
                    self.kill_uml()
            self.poll_once(min(TICK, max((drain_until or now + TICK) - now, 0.0)))
        self.console.close()
        self.stop_children()

    def ended_words(self) -> str:
        assert self.exit is not None
        how = (f"exited with status {self.exit['exitcode']}" if "exitcode" in self.exit
               else f"was killed by signal {self.exit.get('signal')}")
        words = printable(self.console.tail)[-1000:] or "no message"
        return f"UML {how} at once: {words}"

    def poll_once(self, timeout: float) -> None:
        poller = select.poll()
        handlers: dict[int, Any] = {self.wake_r: self.on_wake}
        poller.register(self.wake_r, select.POLLIN)
        if self.listener is not None and self.client is None and self.agent is not None:
            poller.register(self.listener, select.POLLIN)
            handlers[self.listener.fileno()] = self.on_accept
        if self.client is not None:
            events = (select.POLLIN if len(self.to_agent) < BUFFER else 0) | (select.POLLOUT if self.to_client else 0)
            poller.register(self.client, events)
            handlers[self.client.fileno()] = self.on_client
        if self.agent is not None:
            reading = self.client is None or len(self.to_client) < BUFFER
            waiting = unread(self.agent) > 0
            if not waiting:
                self.pokes = 0
            writing = bool(self.to_agent) and not waiting
            if self.to_agent and not writing:
                timeout = min(timeout, LINE_POLL)
            if waiting and self.client is not None:
                self.poke()
                timeout = min(timeout, POKE_EVERY)
            events = (select.POLLIN if reading else 0) | (select.POLLOUT if writing else 0)
            poller.register(self.agent, events)
            handlers[self.agent.fileno()] = self.on_agent
        if self.console_end is not None:
            poller.register(self.console_end, select.POLLIN)
            handlers[self.console_end.fileno()] = self.on_console
        if self.output >= 0:
            poller.register(self.output, select.POLLIN)
            handlers[self.output] = self.on_output
        if self.status >= 0:
            poller.register(self.status, select.POLLIN)
            handlers[self.status] = self.on_status
        try:
            ready = poller.poll(timeout * 1000)
        except InterruptedError:
            return
        for fd, events in ready:
            handler = handlers.get(fd)
            if handler is not None:
                handler(events)

    def on_wake(self, events: int) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def on_accept(self, events: int) -> None:
        assert self.listener is not None
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        self.client = client
        self.to_client.clear()

    def drop_client(self) -> None:
        """Forget the client and what it sent that UML has not been given yet: nobody waits for its answer,
        and stale requests (a readiness probe's syncs while the guest boots) must not pile up on the line."""
        if self.client is not None:
            self.client.close()
            self.client = None
        self.to_client.clear()
        self.to_agent.clear()

    def on_client(self, events: int) -> None:
        assert self.client is not None
        if events & select.POLLOUT and self.to_client:
            try:
                sent = self.client.send(self.to_client)
                del self.to_client[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.drop_client()
                return
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            try:
                data = self.client.recv(min(READ_CHUNK, BUFFER - len(self.to_agent)) or 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.drop_client()
                return
            self.to_agent += data

    def on_agent(self, events: int) -> None:
        assert self.agent is not None
        if events & select.POLLOUT and self.to_agent:
            try:
                sent = self.agent.send(self.to_agent[:LINE_WRITE])
                self.at_boundary = self.to_agent[sent - 1:sent] == b"\n" if sent else self.at_boundary
                self.handed = time.monotonic()
                del self.to_agent[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.close_agent()
                return
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            room = READ_CHUNK if self.client is None else min(READ_CHUNK, BUFFER - len(self.to_client))
            try:
                data = self.agent.recv(max(room, 1))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close_agent()
                return
            if self.client is not None:
                self.to_client += data
            # else: no client, the guest's words are dropped

    def poke(self) -> None:
        """Give UML's line a newline to look at (see :data:`POKE_EVERY`), between requests only."""
        now = time.monotonic()
        if (self.agent is None or not self.at_boundary or self.pokes >= POKE_LIMIT
                or now < max(self.poked, self.handed) + POKE_EVERY):
            return
        self.poked = now
        try:
            self.agent.send(b"\n")
            self.pokes += 1
        except OSError:
            pass

    def close_agent(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        self.to_agent.clear()
        self.drop_client()

    def on_console(self, events: int) -> None:
        assert self.console_end is not None
        try:
            data = self.console_end.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.console_end.close()
            self.console_end = None
            return
        self.console.write(data)

    def on_output(self, events: int) -> None:
        try:
            data = os.read(self.output, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            os.close(self.output)
            self.output = -1
            return
        self.console.write(data)

    def on_status(self, events: int) -> None:
        data = os.read(self.status, 4096)
        if data and len(self.status_message) < 4096:
            self.status_message += data
            return
        if not data:
            os.close(self.status)
            self.status = -1

    # Children ------------------------------------------------------------------------------------
    def reap(self) -> None:
        if self.uml_pid and self.exit is None:
            try:
                ended = os.waitid(os.P_PID, self.uml_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                ended = None
            if ended is not None:
                # UML made itself a session and process group leader; when it dies unclean (killed, OOM),
                # the host processes of its guest's processes and its in-jail vde_plugs live on (one of
                # them busy). While UML is an unreaped zombie its group id cannot be anyone else's: end them.
                try:
                    os.killpg(self.uml_pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.uml_pid and self.exit is None:
                if os.WIFSIGNALED(status):
                    self.exit = {"pid": pid, "signal": os.WTERMSIG(status)}
                else:
                    self.exit = {"pid": pid, "exitcode": os.WEXITSTATUS(status)}
                try:
                    write_file(self.path("uml.exit"), json.dumps(self.exit) + "\n")
                except OSError as exc:
                    sys.stderr.write(f"relay: cannot record UML's exit: {exc}\n")
            self.plugs.pop(pid, None)

    def kill_uml(self) -> None:
        if self.uml_pid and self.exit is None:
            try:
                os.kill(self.uml_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_children(self) -> None:
        """Kill what is left (UML, the plugs) and reap it, so nothing of the VM outlives its relay."""
        self.kill_uml()
        for pid in list(self.plugs):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while (self.plugs or (self.uml_pid and self.exit is None)) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].endswith("/"):
        sys.stderr.write("usage: relay.py RUN_DIR/ <CONFIG_JSON\n")
        return 2
    config = json.loads(sys.stdin.read())
    if not isinstance(config, dict) or config.get("run_dir", "") + "/" != argv[1]:
        sys.stderr.write("relay.py: the configuration is not for this run directory\n")
        return 2
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(report_w)
        return wait_report(report_r, pid, float(config["timeout"]) + 5)
    # The daemon: a session of its own, nothing of the plant's terminal or pipes.
    os.close(report_r)
    try:
        os.setsid()
        os.umask(0o077)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        os.chdir("/")
        Relay(config, report_w).serve()
    finally:
        os._exit(0)


def wait_report(report_r: int, daemon: int, timeout: float) -> int:
    """Print the daemon's report (one JSON line); 0 if UML runs, 1 if not."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([report_r], [], [], left)[0]:
            data = json.dumps({"ok": False, "error": f"the relay did not report within {timeout:g} s"}).encode()
            break
        chunk = os.read(report_r, 65536)
        if not chunk:
            data = data or json.dumps({"ok": False, "error": "the relay ended without a report"}).encode()
            break
        data += chunk
    line = data.split(b"\n", 1)[0]
    sys.stdout.write(line.decode(errors="replace") + "\n")
    sys.stdout.flush()
    try:
        return 0 if json.loads(line).get("ok") is True else 1
    except ValueError:
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
