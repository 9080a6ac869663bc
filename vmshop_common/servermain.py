"""The command line both servers share: ``--config``, ``--host``, ``--port``, ``--log-level``.

:func:`server_main` parses it, makes SIGHUP harmless while the server starts
(:func:`~vmshop_common.lifecycle.record_hangups`), sets up logging (spyne's included), sets
the process's umask to 077 (everything a server makes -- records,
registries, overlays, pool files, sockets -- is its owner's alone: files
0600, directories 0700), calls ``serve(config_path, host, port)`` and turns
a project error into one line on stderr with its stable code and exit
status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vmshop_common.errors import VMShopError
from vmshop_common.lifecycle import record_hangups


def server_main(argv: Sequence[str] | None, *, prog: str, description: str, default_config: str,
                serve: Callable[[Path, str | None, int | None], int]) -> int:
    from vmshop_common.soap.server import configure_spyne_logging

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=default_config, help="the server's configuration file")
    parser.add_argument("--host", help="listen on this address instead of the configured one")
    parser.add_argument("--port", type=int, help="listen on this port instead of the configured one (0: any)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    record_hangups()  # a SIGHUP while the server starts is noted (it reloads once running), not fatal
    os.umask(0o077)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    configure_spyne_logging()
    try:
        return serve(Path(args.config), args.host, args.port)
    except VMShopError as exc:
        print(f"{prog}: [{exc.code}] {exc}", file=sys.stderr)
        return 1
