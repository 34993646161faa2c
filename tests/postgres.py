"""A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, a data folder in
a temporary directory, a free port on 127.0.0.1, its unix socket beside its data.

`make test` installs the package (the Makefile's `postgres` target). PostgreSQL refuses to
run as root, so under root the server runs as the `postgres` user the package creates,
and its folder belongs to that user. Trust authentication on 127.0.0.1 only: a test
server, never reachable from another machine. fsync is off: nothing here must survive
a power cut, and the deployment tests write a lot on a busy machine.

    with Postgres.start() as pg:
        pg.create_database("prefect")
        pg.url("prefect", driver="postgresql+asyncpg")   # for PREFECT_API_DATABASE_CONNECTION_URL
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "llmft"  # the database superuser initdb makes
SERVICE_ACCOUNT = "postgres"  # the account Debian's package creates; runs the server as root


def bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, or None."""
    found = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if (p / "initdb").is_file() and (p / "pg_ctl").is_file()
    ]
    return max(found, key=lambda p: int(p.parent.name)) if found else None


def missing() -> str | None:
    """Why a server cannot start here, with the fix; None when it can."""
    if bin_dir() is None:
        return (
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); fix: "
            "`make postgres` as root, or apt-get install postgresql"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVICE_ACCOUNT)
        except KeyError:
            return (
                f"running as root and there is no {SERVICE_ACCOUNT!r} user to run PostgreSQL "
                "as (it refuses root); fix: apt-get install postgresql, which creates it"
            )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.bin = bin_dir()
        self.data = folder / "data"
        self.log = folder / "server.log"

    @classmethod
    def start(cls) -> Postgres:
        # Not under pytest's tmp_path: its folders are root's alone (0700), so the postgres
        # user could not reach a data folder there.
        folder = Path(tempfile.mkdtemp(prefix="llmft-postgres-"))
        pg = cls(folder, free_port())
        try:
            pg._initdb_and_start()
        except BaseException:
            pg.stop()
            raise
        return pg

    def _as_owner(self, *cmd: str | Path) -> list[str]:
        args = [str(c) for c in cmd]
        return ["runuser", "-u", SERVICE_ACCOUNT, "--", *args] if os.geteuid() == 0 else args

    def _run(self, *cmd: str | Path) -> None:
        done = subprocess.run(self._as_owner(*cmd), capture_output=True, text=True, cwd="/")
        if done.returncode != 0:
            log = self.log.read_text() if self.log.is_file() else ""
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}{log[-3000:]}"
            )

    def _initdb_and_start(self) -> None:
        assert self.bin is not None, missing()
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVICE_ACCOUNT)
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        self.folder.chmod(0o700)
        self._run(
            self.bin / "initdb", "-D", self.data, "-U", USER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.folder}",
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c max_connections=200",  # several Prefect servers' pools in one test run
            ]
        )
        self._run(
            self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options,
            "-w", "-t", "120", "start",
        )  # fmt: skip

    def create_database(self, name: str) -> None:
        self._run(self.bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{USER}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            subprocess.run(
                self._as_owner(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"),
                capture_output=True,
                cwd="/",
            )
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connections(url: str) -> int:
    """Open connections to the database of `url` (a postgresql+asyncpg://user@host:port/db),
    this query's own left out."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE datname = '{parts.path.lstrip('/')}' AND pid <> pg_backend_pid()"
    )
    done = subprocess.run(
        [str(bin_dir() / "psql"), "-h", parts.hostname, "-p", str(parts.port),
         "-U", parts.username, "-d", parts.path.lstrip("/"), "-tAc", query],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(done.stdout.strip())


class PeakConnections:
    """The most connections seen while it runs, sampled every `every` seconds."""

    def __init__(self, url: str, every: float = 2.0) -> None:
        import threading

        self.url, self.every, self.peak = url, every, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stopped.is_set():
            # a sample missed is no matter: the next one counts
            with contextlib.suppress(subprocess.CalledProcessError, ValueError):
                self.peak = max(self.peak, connections(self.url))
            self.stopped.wait(self.every)

    def __enter__(self) -> PeakConnections:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
