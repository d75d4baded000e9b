"""Serve the dashboard: in this process (``workbench serve``) or as a child process beside a run.

Listens on 127.0.0.1 unless told otherwise; only the traces under the given path are reachable.
Run as a module for the child-process form: ``python -m workbench.views.server PATH --port N``.
"""
from __future__ import annotations

import argparse
import errno
import socket
import subprocess
import sys
import time
import webbrowser
from pathlib import Path

from workbench.errors import WorkbenchError

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 5006
APP_NAME = "dashboard"


def free_port(address: str = DEFAULT_ADDRESS) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def check_port_free(address: str, port: int) -> None:
    """Fail fast with a one-line WorkbenchError if the dashboard could not listen on ``port``.

    Binds and releases the port the way the server will (SO_REUSEADDR, as Tornado does, so a port in
    TIME_WAIT is not reported busy). Port 0 always passes: the OS picks a free one.
    """
    if not 0 <= port <= 65535:
        raise WorkbenchError(f"--port {port} is not a TCP port (0-65535; 0 picks a free one)")
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(address or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise WorkbenchError(f"cannot listen on address {address!r}: {e.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                raise port_error(address, port, e) from None


def port_error(address: str, port: int, e: OSError) -> WorkbenchError:
    """The one-line error for a port the dashboard cannot listen on."""
    if e.errno == errno.EADDRINUSE:
        return WorkbenchError(f"port {port} is already in use on {address or 'all interfaces'} (another dashboard "
                              f"running?); choose another with --port N, or --port 0 for a free one")
    return WorkbenchError(f"cannot listen on {address or 'all interfaces'} port {port}: {e.strerror or e}; "
                          f"choose another with --port N, or --port 0 for a free one")


def dashboard_url(address: str, port: int) -> str:
    host = "127.0.0.1" if address in ("", "0.0.0.0", "::") else address
    return f"http://{host}:{port}/{APP_NAME}"


def _origins(address: str, port: int) -> list[str]:
    if address in ("0.0.0.0", "::", ""):
        return ["*"]  # listening everywhere was asked for explicitly; any host name may reach it
    return [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]


def serve(path: str | Path, port: int = DEFAULT_PORT, address: str = DEFAULT_ADDRESS, show: bool = False,
          trace: str | None = None, depth: int | None = None) -> None:
    """Serve the dashboard for ``path`` (one trace or a directory of traces) until Ctrl-C.

    Args:
        path: trace store, or directory containing trace stores; may not exist yet (a run about to start).
        port: TCP port (0 picks a free one).
        address: interface to listen on; 127.0.0.1 keeps it on this machine.
        show: open a browser tab.
        trace: the trace a page opens on (a name under ``path``; it may not exist yet); default: the
            most recently written one. ``?trace=NAME`` in a page's address still chooses another.
        depth: how many directory levels below ``path`` hold traces to list (default: 3).
    """
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise WorkbenchError(f"{root} is not a trace store or directory")
    check_port_free(address, port)  # before Panel's slow import and start
    port = port or free_port(address)

    import panel as pn

    from workbench.views.dashboard import Dashboard

    def app():
        return Dashboard(root, trace=trace, **({} if depth is None else {"depth": depth})).template()

    url = dashboard_url(address, port)
    try:
        server = pn.serve({APP_NAME: app}, port=port, address=address, websocket_origin=_origins(address, port),
                          show=False, start=False, title="workbench", verbose=False)
    except OSError as e:  # taken since the check above
        raise port_error(address, port, e) from None
    if show:  # open the app page itself, not Panel's index of apps
        server.io_loop.add_callback(webbrowser.open, url)
    print(f"workbench dashboard: {url}  (Ctrl-C to stop)", flush=True)
    server.start()
    server.io_loop.start()  # returns on Ctrl-C (Panel installs the SIGINT handler)


def start_server_process(path: str | Path, port: int = 0, address: str = DEFAULT_ADDRESS,
                         timeout: float = 60.0, trace: str | None = None,
                         depth: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``serve`` in a child process and wait until it accepts connections (``trace`` and
    ``depth``: as for ``serve``).

    Returns the process and the dashboard URL. The caller stops it with ``terminate()``.
    """
    check_port_free(address, port)  # a clear error here, not a child that exits with code 2
    port = port or free_port(address)
    cmd = [sys.executable, "-m", "workbench.views.server", str(path), "--port", str(port), "--address", address]
    if trace is not None:
        cmd += ["--trace", trace]
    if depth is not None:
        cmd += ["--depth", str(depth)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = dashboard_url(address, port)
    wait_until_listening(address, port, timeout, proc)
    return proc, url


def wait_until_listening(address: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    host = "127.0.0.1" if address in ("", "0.0.0.0", "::") else address
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise WorkbenchError(f"dashboard server exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise WorkbenchError(f"dashboard server did not start listening on {host}:{port} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.views.server")
    p.add_argument("path")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--address", default=DEFAULT_ADDRESS)
    p.add_argument("--show", action="store_true")
    p.add_argument("--trace", default=None, help="the trace a page opens on (a name under PATH)")
    p.add_argument("--depth", type=int, default=None, help="directory levels below PATH to list traces from")
    args = p.parse_args(argv)
    try:
        serve(args.path, port=args.port, address=args.address, show=args.show, trace=args.trace, depth=args.depth)
    except KeyboardInterrupt:
        pass
    except WorkbenchError as e:
        sys.stderr.write(f"workbench: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
