"""``python -m abm.viz [SCENARIO] [--host H] [--port P]``: watch a scenario play in the browser.

Mesa's SolaraViz is served by Solara; the page itself is ``abm/viz/app.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import sys
from pathlib import Path

from abm.errors import ScenarioError
from abm.scenario import load_scenario
from abm.viz.model import SCENARIO_ENV, default_scenario

APP = Path(__file__).with_name("app.py")


ALLOWED_HOSTS = (
    "allowed: an address of this machine, such as 127.0.0.1 (this machine "
    "only, the default) or 0.0.0.0 (every network interface), or a host name "
    "that resolves to one"
)


def _family(host: str) -> int:
    """The address family ``host`` resolves to (IPv6 for a bare IPv6 address)."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except (OSError, UnicodeError):
        return socket.AF_INET6 if ":" in host else socket.AF_INET


def host_problem(host: str) -> str | None:
    """Why the server could not listen on ``host`` at all, or None if it can.

    The reasons are a name or address that does not resolve, or an address that is not
    this machine's.
    """
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return (
            f"--host {host!r} is not an address or a host name that resolves ({reason}); "
            f"{ALLOWED_HOSTS}"
        )
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError as exc:
        return f"--host {host!r}: cannot listen there ({exc.strerror or exc}); {ALLOWED_HOSTS}"
    return None


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None if it can."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is already in use (another abm-viz or "
                    "server?); pick another with --port N, or --port 0 for a free one"
                )
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def free_port(host: str) -> int:
    """A port that is free on ``host`` now (check the host with host_problem first)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Run the ``python -m abm.viz`` command line: serve the page until interrupted.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 after serving, 2 for a bad scenario file, port or host.
    """
    parser = argparse.ArgumentParser(
        prog="python -m abm.viz",
        description="Serve an interactive view of a scenario (network, plots, heatmaps, "
        "LLM exchanges) on a local web page.",
    )
    parser.add_argument(
        "scenario",
        nargs="?",
        default=None,
        help="scenario TOML file (default: scenarios/round_robin_rules.toml)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8765,
        help="port to listen on (default 8765; 0 picks a free one)",
    )
    args = parser.parse_args(argv)

    path = args.scenario or default_scenario()
    try:
        load_scenario(path)  # a broken file is reported here, not on the page
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"error: --port must be between 0 and 65535; got {args.port}", file=sys.stderr)
        return 2
    # the host first: a name that does not resolve or an address that is not this
    # machine's would otherwise end in a traceback (from free_port or from the server)
    problem = host_problem(args.host)
    port = args.port
    if problem is None:
        port = args.port or free_port(args.host)
        problem = port_problem(args.host, port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    os.environ[SCENARIO_ENV] = str(Path(path).resolve())
    os.environ.setdefault("SOLARA_TELEMETRY_MIXPANEL_ENABLE", "False")  # no calls home
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"abm-viz: serving {path} on http://{shown}:{port} (Ctrl+C to stop)", flush=True)

    from solara.__main__ import run  # imported late: it reads the settings set above

    with contextlib.suppress(KeyboardInterrupt):
        run.main(
            args=[
                str(APP),
                "--host",
                args.host,
                "--port",
                str(port),
                "--production",
                "--no-open",
                "--no-check-version",
            ],
            standalone_mode=False,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
