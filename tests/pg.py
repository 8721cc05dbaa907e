"""A throw-away PostgreSQL server on loopback, for tests and benchmarks.

``PostgresServer`` runs ``initdb`` in a temporary folder and starts ``postgres`` on 127.0.0.1 on a
free port (as the ``postgres`` system user when running as root: the server refuses to run as
root), with trust authentication for local connections only and fsync off (throw-away data).
Binaries come from the Debian package ``postgresql`` (``/usr/lib/postgresql/<version>/bin``, or
``pg_ctl`` on PATH); ``find_bin_dir()`` returns None when it is not installed.

Also a script: ``python tests/pg.py start DIR`` prints the URL of a server kept in DIR;
``python tests/pg.py stop DIR`` stops it.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from net import free_port  # noqa: E402

DB, USER = "autoft", "autoft"


def find_bin_dir() -> Path | None:
    """The folder holding initdb/pg_ctl/postgres, or None if PostgreSQL is not installed."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                   if Path(p).parent.name.isdigit() else 0, reverse=True)
    which = shutil.which("pg_ctl")
    if which:
        cands.append(str(Path(os.path.realpath(which)).parent))
    for c in cands:
        if all(os.access(Path(c) / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


class PostgresServer:
    def __init__(self, folder: str | Path | None = None, port: int | None = None, bin_dir: Path | None = None):
        self.bin = bin_dir or find_bin_dir()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql, or bash .ci/postgres.sh)")
        self.folder = Path(folder or tempfile.mkdtemp(prefix="aftpg"))
        self.data = self.folder / "data"
        self.port = port or free_port()
        self.as_user = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DB}"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        full = [str(c) for c in cmd]
        if self.as_user:
            full = ["runuser", "-u", self.as_user, "--", *full]
        res = subprocess.run(full, capture_output=True, text=True, timeout=120, cwd="/")
        if check and res.returncode != 0:
            log = (self.folder / "server.log")
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(full)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n{tail}")
        return res

    def start(self) -> "PostgresServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(self.folder, self.as_user, self.as_user)
        if not (self.data / "PG_VERSION").exists():
            self._run(self.bin / "initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -F -c max_connections=100"
        self._run(self.bin / "pg_ctl", "-D", self.data, "-o", opts, "-l", self.folder / "server.log", "-w",
                  "-t", "60", "start")
        self._create_db()
        return self

    def _create_db(self) -> None:
        import psycopg2

        for _ in range(50):
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres")
                break
            except psycopg2.OperationalError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"PostgreSQL on port {self.port} does not accept connections")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {DB}")
        conn.close()

    def stop(self, remove: bool = True) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: python tests/pg.py start|stop DIR")
    folder = Path(sys.argv[2]).resolve()
    port_file = folder / "port"
    if sys.argv[1] == "start":
        port = int(port_file.read_text()) if port_file.exists() else None
        srv = PostgresServer(folder, port).start()
        port_file.write_text(str(srv.port))
        print(srv.url)
    else:
        PostgresServer(folder, int(port_file.read_text()) if port_file.exists() else 1).stop(remove=False)
