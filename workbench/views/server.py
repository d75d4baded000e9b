"""Serve the dashboard: in this process (``workbench serve``) or as a child process beside a run.

Listens on 127.0.0.1 unless told otherwise; only the traces under the given path are reachable.
Run as a module for the child-process form: ``python -m workbench.views.server PATH --port N``.
"""
from __future__ import annotations

import argparse
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


def dashboard_url(address: str, port: int) -> str:
    host = "127.0.0.1" if address in ("", "0.0.0.0", "::") else address
    return f"http://{host}:{port}/{APP_NAME}"


def _origins(address: str, port: int) -> list[str]:
    if address in ("0.0.0.0", "::", ""):
        return ["*"]  # listening everywhere was asked for explicitly; any host name may reach it
    return [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]


def serve(path: str | Path, port: int = DEFAULT_PORT, address: str = DEFAULT_ADDRESS, show: bool = False) -> None:
    """Serve the dashboard for ``path`` (one trace or a directory of traces) until Ctrl-C.

    Args:
        path: trace store, or directory containing trace stores; may not exist yet (a run about to start).
        port: TCP port (0 picks a free one).
        address: interface to listen on; 127.0.0.1 keeps it on this machine.
        show: open a browser tab.
    """
    import panel as pn

    from workbench.views.dashboard import Dashboard

    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise WorkbenchError(f"{root} is not a trace store or directory")
    port = port or free_port(address)

    def app():
        return Dashboard(root).template()

    url = dashboard_url(address, port)
    server = pn.serve({APP_NAME: app}, port=port, address=address, websocket_origin=_origins(address, port),
                      show=False, start=False, title="workbench", verbose=False)
    if show:  # open the app page itself, not Panel's index of apps
        server.io_loop.add_callback(webbrowser.open, url)
    print(f"workbench dashboard: {url}  (Ctrl-C to stop)", flush=True)
    server.start()
    server.io_loop.start()  # returns on Ctrl-C (Panel installs the SIGINT handler)


def start_server_process(path: str | Path, port: int = 0, address: str = DEFAULT_ADDRESS,
                         timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start ``serve`` in a child process and wait until it accepts connections.

    Returns the process and the dashboard URL. The caller stops it with ``terminate()``.
    """
    port = port or free_port(address)
    cmd = [sys.executable, "-m", "workbench.views.server", str(path), "--port", str(port), "--address", address]
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
    args = p.parse_args(argv)
    try:
        serve(args.path, port=args.port, address=args.address, show=args.show)
    except KeyboardInterrupt:
        pass
    except WorkbenchError as e:
        sys.stderr.write(f"workbench: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
