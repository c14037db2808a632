"""The deployment in deploy/, run for real on loopback: nginx, N daphne processes, Redis, PostgreSQL.

Everything is started from the committed files, with only the values a test must change
substituted: nginx runs deploy/nginx/relay.conf (upstream servers, listen addresses, certificate
paths and log directory replaced), each daphne runs the ExecStart line of
deploy/systemd/relay@.service with deploy/relay.env.example as its environment. Redis and
PostgreSQL are private to the test (own port, own data directory) so they can be killed and
restarted without touching the machine's shared services. Every wait is on readiness, and every
class cleans up in ``close()`` even after a failure.
"""
from __future__ import annotations

import glob
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX_SITE = DEPLOY / "nginx" / "relay.conf"
SYSTEMD_UNIT = DEPLOY / "systemd" / "relay@.service"
ENV_FILE = DEPLOY / "relay.env.example"
PROCFILE = DEPLOY / "Procfile"
VENV_BIN = Path(sys.executable).parent


class MissingTool(RuntimeError):
    """A binary the fault tests need is not installed (CI installs it in .ci/run)."""


def need(binary: str, hint: str) -> str:
    path = shutil.which(binary) or (binary if os.path.isabs(binary) and os.access(binary, os.X_OK) else None)
    if not path:
        raise MissingTool(f"{binary} is not installed: {hint}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, *, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``check()`` until it returns a truthy value; fail with the process log otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:g} s\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path | None, n: int = 6000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-n:]


# --- the committed files ---------------------------------------------------------------------
def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= and honcho read them (quotes stripped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_exec_start(path: Path = SYSTEMD_UNIT) -> str:
    lines = [line for line in path.read_text().splitlines() if line.startswith("ExecStart=")]
    if len(lines) != 1:
        raise AssertionError(f"{path} must have exactly one ExecStart= line, has {len(lines)}")
    return lines[0][len("ExecStart="):]


def daphne_argv(port: int, env: dict[str, str], *, extra: list[str] | None = None) -> list[str]:
    """The unit's ExecStart for instance ``port``: %i expanded, $VARS split as systemd does."""
    words = shlex.split(unit_exec_start().replace("%i", str(port)))
    argv: list[str] = []
    for word in words:
        m = re.fullmatch(r"\$\{?(\w+)\}?", word)
        if m:
            argv.extend(shlex.split(env.get(m.group(1), "")))
        else:
            argv.append(word)
    if Path(argv[0]).name != "daphne":
        raise AssertionError(f"ExecStart must run daphne, runs {argv[0]}")
    argv[0] = str(VENV_BIN / "daphne")  # /srv/relay/.venv/bin/daphne in production
    app = argv.pop()
    return argv + (extra or []) + [app]


def render_nginx_site(
    *, upstreams: list[str], http_port: int, https_port: int, cert: Path, key: Path, log_dir: Path
) -> str:
    """deploy/nginx/relay.conf with only its deployment-specific values replaced."""
    text = NGINX_SITE.read_text()

    def sub(pattern: str, repl, *, count: int | None = None) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.M)
        if n == 0 or (count is not None and n != count):
            raise AssertionError(f"{NGINX_SITE} changed shape: pattern {pattern!r} matched {n} times")

    block = re.search(r"upstream relay_daphne \{.*?\n\}", text, flags=re.S)
    if block is None:
        raise AssertionError(f"{NGINX_SITE} has no 'upstream relay_daphne' block")
    body = block.group(0)
    servers = re.findall(r"^    server \S+( [^;]*)?;$", body, flags=re.M)
    if not servers:
        raise AssertionError(f"{NGINX_SITE}: the upstream lists no server")
    options = servers[0]  # keep the file's max_fails/fail_timeout
    lines = "\n".join(f"    server {u}{options};" for u in upstreams)
    new_body = re.sub(r"^    server \S+( [^;]*)?;\n", "", body, flags=re.M)
    new_body = new_body.replace("upstream relay_daphne {\n", "upstream relay_daphne {\n" + lines + "\n", 1)
    text = text.replace(body, new_body)

    sub(r"^\s*listen \[::\]:\d+[^;]*;\n", "")
    sub(r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{http_port};", count=1)
    sub(r"^(\s*)listen 443 ssl;", rf"\1listen 127.0.0.1:{https_port} ssl;", count=1)
    sub(r"^(\s*)ssl_certificate\s+\S+;", rf"\1ssl_certificate     {cert};", count=1)
    sub(r"^(\s*)ssl_certificate_key\s+\S+;", rf"\1ssl_certificate_key {key};", count=1)
    sub(r"/var/log/nginx/", f"{log_dir}/")
    return text


# --- processes ---------------------------------------------------------------------------------
class Daphne:
    """One daphne process started exactly as relay@PORT.service would start it."""

    def __init__(self, env: dict[str, str], *, name: str, extra_args: list[str] | None = None, workdir: Path) -> None:
        self.port = free_port()
        self.name = name
        self.env = env
        self.argv = daphne_argv(self.port, env, extra=extra_args)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def upstream(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "Daphne":
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT
        )

        def ready() -> bool:
            try:
                urllib.request.urlopen(f"http://{self.upstream}/v2/listen", timeout=1)
            except urllib.error.HTTPError as exc:
                return exc.code == 426
            except OSError:
                return False
            return False

        wait_until(ready, timeout=timeout, what=f"daphne {self.name}", proc=self.proc, log=self.log_path)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident set size from /proc (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Nginx:
    """deploy/nginx/relay.conf in front of the given daphne processes, TLS with a throwaway cert."""

    def __init__(self, upstreams: list[str], *, workdir: Path, worker_connections: int = 1024) -> None:
        """``worker_connections``: two per stream (docs/deploy.md sizes it for the host's streams)."""
        self.binary = need("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx", "apt-get install nginx")
        self.prefix = workdir / "nginx"
        self.prefix.mkdir()
        self.http_port = free_port()
        self.https_port = free_port()
        self.cert, self.key = self._certificate()
        site = render_nginx_site(
            upstreams=upstreams, http_port=self.http_port, https_port=self.https_port,
            cert=self.cert, key=self.key, log_dir=self.prefix,
        )
        (self.prefix / "relay.conf").write_text(site)
        temp = {name: self.prefix / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir()
        user = "user root;\n" if os.geteuid() == 0 else ""
        # The main file stands in for Debian's /etc/nginx/nginx.conf; the site is deploy's.
        (self.prefix / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {self.prefix}/nginx.pid;\n"
            f"worker_rlimit_nofile {max(1024, 4 * worker_connections)};\n"
            f"error_log {self.prefix}/error.log info;\nevents {{ worker_connections {worker_connections}; }}\n"
            "http {\n"
            f"    client_body_temp_path {temp['client_body']};\n    proxy_temp_path {temp['proxy']};\n"
            f"    fastcgi_temp_path {temp['fastcgi']};\n    uwsgi_temp_path {temp['uwsgi']};\n"
            f"    scgi_temp_path {temp['scgi']};\n    access_log {self.prefix}/access.log;\n"
            f"    include {self.prefix}/relay.conf;\n}}\n"
        )
        self.log_path = self.prefix / "stderr.log"
        self.proc: subprocess.Popen | None = None
        self.ssl = ssl.create_default_context(cafile=str(self.cert))

    def _certificate(self) -> tuple[Path, Path]:
        openssl = need("openssl", "apt-get install openssl")
        cert, key = self.prefix / "cert.pem", self.prefix / "key.pem"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )
        return cert, key

    def args(self) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), "-e", str(self.prefix / "error.log")]

    def check_config(self) -> None:
        out = subprocess.run(self.args() + ["-t"], capture_output=True, text=True)
        if out.returncode:
            raise AssertionError(f"nginx -t rejected the rendered deploy/nginx/relay.conf:\n{out.stderr}")

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.https_port}"

    def start(self, timeout: float = 30) -> "Nginx":
        self.check_config()
        self.proc = subprocess.Popen(self.args(), stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)

        def ready() -> bool:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{self.https_port}/v2/listen", timeout=2, context=self.ssl)
            except urllib.error.HTTPError as exc:
                return exc.code == 426
            except OSError:
                return False
            return False

        wait_until(ready, timeout=timeout, what="nginx", proc=self.proc, log=self.prefix / "error.log")
        return self

    #: Where the logs go: nginx's own (the main file's error_log) and the site's (deploy's relay.conf
    #: logs its server's errors, the upstream ones among them, to relay.error.log).
    ERROR_LOGS = ("error.log", "relay.error.log")

    def output(self) -> str:
        return "\n".join(_tail(self.prefix / name, 4000) for name in self.ERROR_LOGS)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, the master exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Redis:
    """A private redis-server on a free port (never the machine's shared 6379)."""

    def __init__(self, *, workdir: Path) -> None:
        self.binary = need("redis-server", "apt-get install redis-server")
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> "Redis":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
        )
        wait_until(self._ping, timeout=20, what="redis-server", proc=self.proc, log=self.log_path)
        return self

    def kill(self) -> None:
        """Stop hard (SIGKILL): every connection drops and, with no persistence, all state goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()


class Postgres:
    """A throwaway PostgreSQL cluster (initdb in a temp directory, trust auth, own port)."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if not bins:
            need("initdb", "apt-get install postgresql (the server package provides initdb and pg_ctl)")
            self.bindir = Path(shutil.which("initdb")).parent
        else:
            self.bindir = Path(bins[-1]).parent
        self.port = free_port()
        # Its own temp directory (not under pytest's 0700 one) so the postgres user can reach it.
        self.base = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"
        self.as_postgres = os.geteuid() == 0  # PostgreSQL refuses to run as root
        if self.as_postgres:
            need("runuser", "apt-get install util-linux")
            shutil.chown(self.base, "postgres", "postgres")
        self.initialised = False

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def db_url(self, name: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> "Postgres":
        if not self.initialised:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
            self.initialised = True
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off -c full_page_writes=off"
        argv = ["pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60"]
        if action in ("start", "restart"):
            argv += ["-o", opts]
        if action in ("stop", "restart"):
            argv += ["-m", extra[0] if extra else "fast"]
        out = self._run(*argv, action, check=False)
        if out.returncode:
            raise RuntimeError(f"pg_ctl {action} failed: {out.stdout}{out.stderr}\n{_tail(self.log_path)}")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", mode)

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl("restart", mode)

    def close(self) -> None:
        if self.initialised and (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def relay_env(*, database_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    """deploy/relay.env.example with the values a test machine must change."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "RELAY_", "DATABASE_", "REDIS_"))}
    env.update(read_env_file())
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DJANGO_CSRF_TRUSTED_ORIGINS": "https://127.0.0.1",
            "RELAY_ALLOWED_ORIGINS": "https://127.0.0.1",
            "RELAY_ENGINE": "fake",
            "RELAY_LOG_FORMAT": "kv",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def migrate(env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"migrate failed:\n{out.stdout}{out.stderr}")
