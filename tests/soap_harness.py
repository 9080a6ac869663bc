"""Start SOAP servers (and run Twisted code) for tests, in a thread or in a subprocess.

Twisted's reactor can be run only once per process, so pytest-twisted style
"one reactor per test" is impossible, and running it in the pytest thread
would block the tests. Two ways are offered, both real reactors on real
127.0.0.1 sockets:

1. **In-process: one reactor thread for the whole session**
   (:func:`reactor_thread`). The reactor runs in a daemon thread started on
   first use and stopped at interpreter exit (it cannot be restarted, so
   never stop it from a fixture). Tests build sites with
   ``vmshop_common.soap.server.build_site`` and serve them with
   :func:`serve_in_thread`; code that must run in the reactor thread (e.g.
   ``AsyncSoapClient.call``) runs through :meth:`ReactorThread.call`, which
   waits for a Deferred's result with a timeout. Cheap (no process start),
   lets a test reach into the server's objects. Use it from a
   session-scoped fixture::

       @pytest.fixture(scope="session")
       def reactor():
           return soap_harness.reactor_thread()

2. **Subprocess** (:func:`start_subprocess_server`): runs
   ``python tests/soap_harness.py serve module:factory`` which imports
   ``factory``, calls it (``--arg key=value`` become keyword arguments, all
   ``str``), listens on every site it returns and prints one line
   ``SOAP-HARNESS LISTENING <port> [<port>...]``. Use it for servers that
   must be isolated (their own reactor, signals, crash, CPU), e.g. the shop
   and its plants in end-to-end tests or benchmarks. The factory returns a
   ``SoapSite`` or a list of them (a public URL with ``{port}`` is completed
   on listen).

Both bind 127.0.0.1 only. In-process servers speak mutual TLS with the
session's PKI (``tests/pki.py``; the server presents the ``shop``
certificate) unless ``tls=False``; subprocess servers take ``tls`` as the
three PEM files, and are plain HTTP (insecure, loopback) without.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import importlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "SOAP-HARNESS LISTENING"
LOCALHOST = "127.0.0.1"


# --- 1. one reactor thread per process ------------------------------------------------


class ReactorThread:
    """The global Twisted reactor running in a daemon thread.

    There is one per process (see :func:`reactor_thread`); once stopped it
    cannot run again.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def reactor(self) -> Any:
        """The reactor object (touch it only from the reactor thread, or via :meth:`call`)."""
        from twisted.internet import reactor

        return reactor

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def start(self, timeout: float = 10.0) -> None:
        """Start the reactor thread if it is not running; wait until the reactor runs."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the reactor thread was stopped; a reactor cannot be restarted in a process")
            if self._thread is not None:
                return
            import vmshop_common.soap.compat  # noqa: F401  (before anything imports spyne.server.twisted)

            reactor = self.reactor
            if reactor.running:
                # Started by another copy of this module (imported under another
                # name): adopt that thread rather than failing.
                self._thread = next(
                    (t for t in threading.enumerate() if t.name == "twisted-reactor"), threading.main_thread()
                )
                return
            started = threading.Event()
            reactor.callWhenRunning(started.set)
            self._thread = threading.Thread(
                target=reactor.run, kwargs={"installSignalHandlers": False}, name="twisted-reactor", daemon=True
            )
            self._thread.start()
            if not started.wait(timeout):
                raise RuntimeError("the reactor did not start")

    def call(self, fn: Callable[..., Any], /, *args: Any, timeout: float = 30.0, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the reactor thread; return its result.

        If ``fn`` returns a Deferred, wait for it and return its result or
        raise its exception. After ``timeout`` seconds the Deferred is
        cancelled and ``TimeoutError`` raised.
        """
        from twisted.internet import defer

        if threading.current_thread() is self._thread:
            raise RuntimeError("ReactorThread.call from the reactor thread would deadlock")
        self.start()
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            d = defer.maybeDeferred(fn, *args, **kwargs)
            box["d"] = d

            def ok(result: Any) -> None:
                box["result"] = result
                done.set()

            def bad(failure: Any) -> None:
                box["failure"] = failure
                done.set()

            d.addCallbacks(ok, bad)

        self.reactor.callFromThread(run)
        if not done.wait(timeout):
            d = box.get("d")
            if d is not None:
                self.reactor.callFromThread(d.cancel)
            raise TimeoutError(f"{getattr(fn, '__name__', fn)!r} did not finish within {timeout} s")
        if "failure" in box:
            box["failure"].raiseException()
        return box.get("result")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the reactor (for good) and join its thread."""
        with self._lock:
            if self._thread is None or self._stopped:
                self._stopped = True
                return
            self._stopped = True
            reactor = self.reactor
            reactor.callFromThread(reactor.stop)
            self._thread.join(timeout)


_REACTOR_THREAD: ReactorThread | None = None
_REACTOR_LOCK = threading.Lock()


def reactor_thread() -> ReactorThread:
    """The process-wide :class:`ReactorThread`, started on first use, stopped at exit."""
    global _REACTOR_THREAD
    with _REACTOR_LOCK:
        if _REACTOR_THREAD is None:
            _REACTOR_THREAD = ReactorThread()
            atexit.register(_REACTOR_THREAD.stop)
        rt = _REACTOR_THREAD
    rt.start()
    return rt


@dataclass
class ServedSite:
    """A site listening in the reactor thread."""

    site: Any
    listening: Any
    host: str
    port: int
    rt: ReactorThread
    scheme: str = "https"

    @property
    def url(self) -> str:
        """``https://127.0.0.1:<port>/`` (``http`` without TLS): where to send requests."""
        return f"{self.scheme}://{self.host}:{self.port}/"

    @property
    def wsdl_url(self) -> str:
        return self.url + "?wsdl"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening (open connections are left to close by themselves)."""
        self.rt.call(self.listening.stopListening, timeout=timeout)


def serve_in_thread(site: Any, host: str = LOCALHOST, port: int = 0, *, rt: ReactorThread | None = None,
                    tls: bool = True, require_client_certificate: bool = True) -> ServedSite:
    """Listen for ``site`` on ``host:port`` in the reactor thread (``port=0``: a free port), over mutual TLS
    with the session's PKI (the ``shop`` certificate), or plain HTTP with ``tls=False``."""
    from pki import test_pki

    from vmshop_common.soap.server import bound_port, listen

    rt = rt or reactor_thread()
    creds = test_pki().credentials("shop") if tls else None
    listening = rt.call(listen, site, host, port, tls=creds, insecure=not tls,
                        require_client_certificate=require_client_certificate)
    return ServedSite(site=site, listening=listening, host=host, port=bound_port(listening), rt=rt,
                      scheme="https" if tls else "http")


# --- 2. servers in a subprocess ----------------------------------------------------------


@dataclass
class SubprocessServer:
    """A server process started by :func:`start_subprocess_server`."""

    process: subprocess.Popen[str]
    ports: list[int]
    host: str = LOCALHOST
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200))
    scheme: str = "http"

    @property
    def port(self) -> int:
        """The first (often only) port."""
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/"

    def urls(self) -> list[str]:
        return [f"{self.scheme}://{self.host}:{p}/" for p in self.ports]

    def log(self) -> str:
        """The last lines the process printed (stdout and stderr)."""
        return "".join(self.output)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (the reactor stops cleanly), SIGKILL after ``timeout``; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return int(self.process.returncode)


def _drain(stream: Any, sink: collections.deque[str], ready: Callable[[str], None]) -> None:
    for line in stream:
        sink.append(line)
        ready(line)
    stream.close()


def start_subprocess_server(
    factory: str,
    *,
    host: str = LOCALHOST,
    port: int = 0,
    args: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    tls: tuple[str | Path, str | Path, str | Path] | None = None,
) -> SubprocessServer:
    """Start ``python tests/soap_harness.py serve factory`` and wait until it listens.

    :param factory: ``"package.module:callable"``, importable with the repo
        root on ``sys.path``; called with ``args`` as keyword arguments; returns
        a site or a list of sites.
    :param port: first port (``0``: free ports); with several sites and a
        non-zero port, they get ``port``, ``port+1``...
    :param tls: (certificate, key, CA bundle) to serve over mutual TLS; ``None``: plain HTTP.
    :raises RuntimeError: the process exited or did not print its ready line
        within ``timeout`` seconds (the message carries its output).
    """
    argv = [sys.executable, str(Path(__file__).resolve()), "serve", factory, "--host", host, "--port", str(port)]
    if tls is not None:
        argv += ["--tls", *(str(part) for part in tls)]
    for key, value in (args or {}).items():
        argv += ["--arg", f"{key}={value}"]
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env,
        cwd=str(REPO_ROOT),
    )
    output: collections.deque[str] = collections.deque(maxlen=200)
    found: list[list[int]] = []
    ready = threading.Event()

    def on_line(line: str) -> None:
        m = re.match(re.escape(READY_LINE) + r"((?: \d+)+)\s*$", line)
        if m and not found:
            found.append([int(p) for p in m.group(1).split()])
            ready.set()

    threading.Thread(target=_drain, args=(proc.stdout, output, on_line), daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            time.sleep(0.1)  # let the drain thread catch the last lines
            raise RuntimeError(f"server {factory} did not start (exit status {proc.returncode}):\n" + "".join(output))
    return SubprocessServer(process=proc, ports=found[0], host=host, output=output,
                            scheme="https" if tls is not None else "http")


def _load_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"factory must be 'module:callable', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """``serve module:factory [--host H] [--port P] [--arg k=v ...]``: run a server until SIGTERM."""
    parser = argparse.ArgumentParser(prog="soap_harness")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("factory")
    serve.add_argument("--host", default=LOCALHOST)
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--arg", action="append", default=[])
    serve.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"), help="serve over mutual TLS")
    opts = parser.parse_args(argv)

    from twisted.internet import reactor

    import vmshop_common.soap.compat  # noqa: F401
    from vmshop_common.soap.server import bound_port, listen
    from vmshop_common.tls import load_credentials

    creds = load_credentials(*opts.tls) if opts.tls else None
    kwargs = dict(a.split("=", 1) for a in opts.arg)
    sites = _load_factory(opts.factory)(**kwargs)
    if not isinstance(sites, (list, tuple)):
        sites = [sites]
    ports = []
    for i, site in enumerate(sites):
        ports.append(bound_port(listen(site, opts.host, opts.port + i if opts.port else 0, tls=creds,
                                       insecure=creds is None)))
    print(READY_LINE, *ports, flush=True)
    run: Any = reactor.run  # type: ignore[attr-defined,misc]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
