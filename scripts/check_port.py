"""`make run` / `make serve-prod`: stop with a way out when the port is taken, not with daphne's Errno 98.

Usage: check_port.py HOST PORT "make run"
"""
from __future__ import annotations

import socket
import sys


def free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as daphne binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main() -> int:
    host, port, command = sys.argv[1].strip("[]"), int(sys.argv[2]), sys.argv[3]
    if free(host, port):
        return 0
    other = next((p for p in range(port + 1, port + 100) if free(host, p)), None)
    hint = f"`{command} PORT={other}`" if other else f"`{command} PORT=...` with a free port"
    print(f"Port {port} on {host} is already in use (another relay or server?). Stop it, or pick another port: {hint}.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
