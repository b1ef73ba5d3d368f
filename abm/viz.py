"""``python -m abm.viz [SCENARIO] [--host H] [--port P]``: watch a scenario play in the
browser (Mesa's SolaraViz served by Solara; the page itself is ``abm/app.py``)."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from abm.errors import ScenarioError
from abm.scenario import load_scenario
from abm.viz_model import SCENARIO_ENV, default_scenario

APP = Path(__file__).with_name("app.py")


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use (another abm-viz or "
                        "server?); pick another with --port N, or --port 0 for a free one")
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; serves until interrupted, returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m abm.viz",
        description="Serve an interactive view of a scenario (network, plots, heatmaps, "
                    "LLM exchanges) on a local web page.")
    parser.add_argument("scenario", nargs="?", default=None,
                        help="scenario TOML file (default: scenarios/round_robin_rules.toml)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765,
                        help="port to listen on (default 8765; 0 picks a free one)")
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

    try:
        run.main(args=[str(APP), "--host", args.host, "--port", str(port), "--production",
                       "--no-open", "--no-check-version"], standalone_mode=False)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
