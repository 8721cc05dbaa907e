"""Where a study lives: opening its storage, showing its URL without secrets, autoft's own state.

* :func:`open_storage` opens an Optuna storage for a URL: an RDB (``sqlite:///``, ``postgresql://``,
  ``mysql://``, ...) with heartbeats, or a journal file (``journal:/path/study.log``).  A storage that
  cannot be opened (a folder that does not exist, a server that refuses the connection, a driver that
  is not installed) is one :class:`StorageError` naming the redacted URL, at once: only the races of
  several processes creating the same schema are retried.
* :func:`redact_url` replaces the password of a URL (``user:PASSWORD@host``, ``?password=...``) by
  ``***``: every place a storage URL is shown or written uses it.
* :func:`state_dir` / :func:`study_state_dir`: a folder only autoft writes (per user), for state that
  is read back in ways a results folder from elsewhere must not reach (a Ray sweep's experiment,
  which ``Tuner.restore`` unpickles).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import random
import re
import time
import warnings
from pathlib import Path

import optuna

from autoft.errors import AutoftError
from autoft.study.record import RUN_BOOKKEEPING

log = logging.getLogger(__name__)
# heartbeats and the retry callback are marked experimental; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# user attributes of one run of a trial, which a heartbeat retry must not inherit
RUN_ATTRS = RUN_BOOKKEEPING


class StorageError(AutoftError):
    """The study storage cannot be opened (the message names its URL, password hidden)."""


# -- redaction -----------------------------------------------------------------------------------
_SECRET_KEYS = ("password", "passwd", "pwd", "pass", "secret", "token", "access_token", "auth_token", "api_key",
                "apikey", "sslpassword", "sslkey_password")
_QUERY_SECRET = re.compile(r"([?&;](?:" + "|".join(_SECRET_KEYS) + r")=)([^&;#]*)", re.IGNORECASE)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)(.*)", re.DOTALL)


def _userinfo(url: str) -> tuple[str, str, str, str] | None:
    """``(scheme://, user, password, rest from '@')`` of a URL with a password, else None.

    The password ends at the last '@' before the query string (or in the whole URL when the password
    itself holds a '?'), so unescaped '@', ':' and '/' in a password are hidden too."""
    m = _SCHEME.fullmatch(url)
    if not m:
        return None
    scheme, rest = m.groups()
    q = rest.find("?")
    at = rest.rfind("@", 0, q if q >= 0 else len(rest))
    if at < 0:
        at = rest.rfind("@")
    if at < 0:
        return None
    user, sep, password = rest[:at].partition(":")
    if not sep or "/" in user:  # no password (user@host), or an '@' in a path (sqlite:////a/b@c.db)
        return None
    return scheme, user, password, rest[at:]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: in the user information
    (``postgresql://user:***@host/db``, any scheme) and in query parameters such as ``password=``."""
    if not isinstance(url, str):
        return url
    parts = _userinfo(url)
    if parts:
        scheme, user, _, rest = parts
        url = f"{scheme}{user}:***{rest}"
    return _QUERY_SECRET.sub(r"\1***", url)


def _secrets(url: str) -> list[str]:
    parts = _userinfo(url) if isinstance(url, str) else None
    found = [parts[2]] if parts and parts[2] else []
    found += [m.group(2) for m in _QUERY_SECRET.finditer(url or "") if m.group(2)]
    return found


def redact_text(text: str, url: str) -> str:
    """``text`` (an error message, a log line) with ``url`` and its password hidden."""
    text = str(text).replace(url, redact_url(url)) if url else str(text)
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# -- opening a storage ---------------------------------------------------------------------------
def is_journal(url: str) -> bool:
    return url.startswith(("journal:", "file:")) or url.endswith((".log", ".journal"))


def journal_path(url: str) -> str:
    return url.split(":", 1)[1] if url.startswith(("journal:", "file:")) else url


def postgres_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy 2.1 assumes psycopg 3,
    earlier versions psycopg2; ``pip install autoft[postgres]`` brings psycopg2)."""
    import importlib.util

    if url.startswith(("postgresql://", "postgres://")) and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


class RetryStaleTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's heartbeat retry, without the dead run's bookkeeping in the queued copy.

    Optuna copies every user attribute of the stale trial into its retry, including ``worker`` (the
    dead process): until the worker that picks the retry up records itself, another worker starting
    its recovery of orphaned trials would take the retry for an orphan of that dead process and fail it."""

    def __call__(self, study: optuna.Study, trial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in RUN_ATTRS}
        super().__call__(study, trial)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite://`` URL (None: in memory, or a URI this cannot read)."""
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def _folder_must_exist(path: Path, shown: str) -> None:
    folder = path.expanduser().absolute().parent
    if not folder.is_dir():
        raise StorageError(f"cannot open the study storage {shown}: the folder {folder} does not exist "
                           "(create it, or pass another --storage)")


# an OperationalError that another try will not cure: nothing to wait for.  (SQLite's "unable to open
# database file" is still retried: a missing folder is caught before, and under load it can pass.)
_UNREACHABLE = re.compile(
    r"connection refused|could not connect|could not translate host|name or service not known|no route to host|"
    r"network is unreachable|timeout expired|timed out|authentication failed|"
    r"no password supplied|(database|role) \"[^\"]*\" does not exist|can't connect|unknown database|access denied|"
    r"unknown mysql server host|permission denied|readonly database|read-only", re.IGNORECASE)


def _retrying(fn, attempts: int = 8):
    """Run ``fn``, retrying when several processes race to create the same schema or study (never when
    the storage cannot be reached at all)."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    for i in range(attempts):
        try:
            return fn()
        except (IntegrityError, OperationalError, optuna.exceptions.DuplicatedStudyError) as exc:
            if i == attempts - 1 or (isinstance(exc, OperationalError) and _UNREACHABLE.search(str(exc))):
                raise
            time.sleep(0.2 + random.random() * 0.5 * (i + 1))


def _reason(exc: BaseException, url: str) -> str:
    orig = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
    text = f"{type(orig).__name__}: {lines[0] if lines else 'no message'}"
    if isinstance(orig, ModuleNotFoundError):
        text += " (PostgreSQL needs 'pip install autoft[postgres]')" if "psycopg" in str(orig) else ""
    return redact_text(text, url)[:500]


def open_storage(url: str, *, stale_trial_callback=None) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: RDB (sqlite://, postgresql://, ...) with heartbeats (10 s beat, 30 s
    grace; a stale trial is failed and retried once), or a journal file (``journal:PATH``, ``*.log``).

    Raises :class:`StorageError` (URL redacted) when it cannot be opened."""
    shown = redact_url(url)
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend

        path = journal_path(url)
        _folder_must_exist(Path(path), shown)
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        except OSError as exc:
            raise StorageError(f"cannot open the study storage {shown}: {_reason(exc, url)}") from None
    kwargs = {}
    driver_url = postgres_driver(url)
    try:
        if driver_url.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
            db = sqlite_file(driver_url)
            if db is not None:
                _folder_must_exist(db, shown)
        callback = stale_trial_callback or RetryStaleTrial(max_retry=1)
        storage = _retrying(lambda: optuna.storages.RDBStorage(
            driver_url, heartbeat_interval=10, grace_period=30, heartbeat_stale_trial_callback=callback, **kwargs))
    except StorageError:
        raise
    except Exception as exc:  # driver missing, malformed URL, refused connection, bad file: one message
        raise StorageError(f"cannot open the study storage {shown}: {_reason(exc, url)}") from None
    if driver_url.startswith("sqlite") and ":memory:" not in driver_url:
        _fast_sqlite(storage.engine)
    return storage


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer; one fsync per checkpoint
    cur.execute("PRAGMA synchronous=NORMAL")  # safe in WAL: a crashed process loses nothing committed
    cur.close()


def _fast_sqlite(engine) -> None:
    """Write-ahead log for a SQLite study: every trial makes a few dozen small commits (parameters,
    attributes, one report per epoch), and with SQLite's default rollback journal each one waits for
    two fsyncs. WAL with synchronous=NORMAL keeps the database consistent when a process is killed
    (only an OS crash or power loss can drop the last commits) and lets workers on the same machine
    read while one writes. (WAL needs a local file system, as SQLite with several processes does anyway.)"""
    import sqlalchemy

    sqlalchemy.event.listen(engine, "connect", _sqlite_pragmas)
    engine.dispose()  # connections opened while creating the schema are reopened with the pragmas


# -- autoft's own state ----------------------------------------------------------------------------
def state_dir() -> Path:
    """A folder only autoft writes, per user: ``$AUTOFT_STATE_DIR``, else ``$XDG_STATE_HOME/autoft``, else
    ``~/.local/state/autoft``.  (Not ``AUTOFT_HOME``: that folder of weights and data may be shared.)"""
    env = os.environ.get("AUTOFT_STATE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return (base / "autoft").resolve()


def study_state_dir(study_dir: str | Path, kind: str) -> Path:
    """``<state_dir>/<kind>/<task>-<study>-<hash>``: the state of the study whose results go to
    ``study_dir``, keyed by a hash of its resolved path (the same study finds it again, another results
    folder never does).  Not created here."""
    study_dir = Path(study_dir).resolve()
    key = hashlib.sha256(str(study_dir).encode()).hexdigest()[:16]
    return state_dir() / kind / f"{study_dir.parent.name}-{study_dir.name}-{key}"


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) readable and writable by this user only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


# -- malformed records -----------------------------------------------------------------------------
_WARNED: set = set()


def warn_malformed(trial: int | None, attr: str, value, consequence: str) -> None:
    """Log once per process that a trial's (or the study's, ``trial=None``) attribute ``attr`` is malformed:
    another process of a shared study wrote it (older version, bug, or on purpose).  It is skipped."""
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    key = (trial, attr, shown)
    if key in _WARNED:
        return
    _WARNED.add(key)
    who = "the study" if trial is None else f"trial {trial}"
    log.warning("%s: attribute '%s' is malformed (%s); %s", who, attr, shown, consequence)
