"""Output storage for the jobs: a local folder or an fsspec URL (s3://bucket/prefix), in bounded time.

Every job reads and writes its outputs through this module so that three promises hold everywhere:

- bounded time: a remote endpoint that accepts connections and never answers fails within about
  `timeout_s` (default 10 s) with one clear line, instead of hanging for minutes;
- atomic writes: readers see either the old object or the complete new one, never a partial one;
- no leaked credentials: every failure is a `StorageError` whose one-line message has the known
  secrets (storage_options values, AWS_* environment variables) replaced by ***.

Why a wall clock and not only per-request timeouts. s3fs passes `connect_timeout`/`read_timeout`
to aiohttp as *socket* timeouts, and then multiplies them: botocore retries each request and s3fs
retries timeouts again on top (5 x 5 attempts of 15 s by default, the ~420 s hang). Worse, aiohttp
only starts its read timer once a request body is fully sent, and botocore asks for
`Expect: 100-continue` on uploads: a PUT to a silent endpoint waits for the "100 Continue" forever,
whatever read_timeout says. So each remote operation runs in a daemon thread that the caller stops
waiting for at its deadline; the small per-request timeouts only keep the abandoned work short.
Transfers whose size is known get a deadline that grows with the size (`MIN_BYTES_PER_S`), and
`put_file` resets its deadline whenever a part finishes uploading, so a big upload is bounded per
part, not as a whole.
"""
from __future__ import annotations

import asyncio
import io
import os
import re
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.callbacks import Callback


class StorageError(ValueError):
    """one-line storage failure (the CLI prints it and exits non-zero)"""


DEFAULT_TIMEOUT_S = 10.0
# Slowest transfer rate we still call "working": a 50 MB object may take 50 s more than timeout_s.
MIN_BYTES_PER_S = 1 << 20
# Server-side copies (the "rename" that publishes an upload) are far faster than the client link.
MIN_COPY_BYTES_PER_S = 16 << 20
# Multipart uploads: parts of this size, this many in flight. The deadline of a big upload is reset
# each time a part lands, so it must cover one batch of parts at MIN_BYTES_PER_S.
UPLOAD_PART_BYTES = 16 << 20
UPLOAD_PARTS_IN_FLIGHT = 4
# botocore attempts per request (1 retry for a throttled or dropped request); s3fs's own retry loop
# around it is cut to a single pass, as it only re-runs timeouts we want reported.
S3_MAX_ATTEMPTS = 2
S3FS_RETRIES = 1

MESSAGE_MAX_CHARS = 200
REDACTED = "***"
_SENSITIVE_KEY = re.compile(r"key|secret|token|pass|credential|session|auth|connection_string|sas|signature",
                            re.IGNORECASE)
_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# Shorter "secrets" would replace ordinary words in every message and protect nothing.
_MIN_SECRET_CHARS = 4
_S3_PROTOCOLS = ("s3", "s3a")
_TIMEOUT_FIX = "check the endpoint and network, or raise storage_timeout_s"
_LOCAL_WRITE_FIX = "pick a folder you can write to or fix its permissions"
_umask_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------
# URLs


def is_remote(url: str) -> bool:
    """True for fsspec URLs (s3://, gs://, memory://...); local paths and file:// are local."""
    return "://" in url and not url.startswith("file://")


def join(url: str, *parts: str) -> str:
    """Posix join for URLs and local paths; a part's leading "/" never restarts from the root."""
    result = url
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        if not result:
            result = part
        elif result.endswith("/"):
            result += part
        else:
            result += "/" + part
    return result


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


# ---------------------------------------------------------------------------------------------
# Secrets


def _env_secrets() -> list[str]:
    return [os.environ[name] for name in _SECRET_ENV_VARS if os.environ.get(name)]


def _option_secrets(value: Any, under_sensitive_key: bool = False) -> list[str]:
    """String values found under key/secret/token/... keys anywhere in storage_options."""
    if isinstance(value, dict):
        found: list[str] = []
        for key, item in value.items():
            sensitive = under_sensitive_key or (isinstance(key, str) and bool(_SENSITIVE_KEY.search(key)))
            found += _option_secrets(item, sensitive)
        return found
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _option_secrets(item, under_sensitive_key)]
    return [value] if under_sensitive_key and isinstance(value, str) else []


def _scrub(text: str, secrets: Iterable[str]) -> str:
    # longest first, so a secret that contains another one is replaced whole
    usable = {s for s in secrets if isinstance(s, str) and len(s) >= _MIN_SECRET_CHARS}
    for secret in sorted(usable, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact(value: Any) -> Any:
    """Copy of `value` safe to log: sensitive dict keys -> ***, AWS env secret values -> ***."""
    if isinstance(value, dict):
        return {key: REDACTED if isinstance(key, str) and _SENSITIVE_KEY.search(key) else redact(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str):
        return _scrub(value, _env_secrets())
    return value


def safe_message(err: BaseException, secrets: Iterable[str] = ()) -> str:
    """First line of `err` (at most ~200 chars) with every known secret replaced by ***."""
    text = str(err).strip() or type(err).__name__
    line = text.splitlines()[0].strip()
    # scrub before cutting, so a secret cut in half at the limit is not half shown
    line = _scrub(line, [*secrets, *_env_secrets()])
    if len(line) > MESSAGE_MAX_CHARS:
        line = line[:MESSAGE_MAX_CHARS - 3] + "..."
    return line


# ---------------------------------------------------------------------------------------------
# Filesystems


def _check_timeout(timeout_s: float) -> None:
    if not timeout_s or timeout_s <= 0:
        raise StorageError(f"storage timeout {timeout_s!r} s is not positive; pass a number of seconds > 0")


def _s3_options(options: dict, timeout_s: float) -> dict:
    """Add botocore timeouts and few retries unless the user chose them (fsspec config included)."""
    configured = fsspec.config.conf.get("s3", {}).get("config_kwargs") or {}
    config = {**configured, **(options.get("config_kwargs") or {})}
    config.setdefault("connect_timeout", timeout_s)
    config.setdefault("read_timeout", timeout_s)
    config.setdefault("retries", {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
    return {**options, "config_kwargs": config}


_INSTANCES: dict[str, fsspec.AbstractFileSystem] = {}
_INSTANCES_LOCK = threading.Lock()


def filesystem(url: str, storage_options: dict | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` (and the path inside it), with timeouts for s3.

    One instance per (protocol, options, timeout) in this process, reused: a new s3fs client
    costs ~180 ms per operation against a local S3 (7 ms reused), which at a few operations per
    segment dominated a long video's wall time. An instance that failed or was abandoned is
    dropped (`_forget`), so a fault never poisons later calls. No listings cache: another
    process (a resumed run) may have written since.
    """
    _check_timeout(timeout_s)
    # copies only: the caller's dict (and its config_kwargs) stays as it was
    options = dict(storage_options or {})
    protocol = _protocol(url)
    if protocol in _S3_PROTOCOLS:
        options = _s3_options(options, timeout_s)
        options.setdefault("use_listings_cache", False)
    # never fsspec's shared cache: the instance is ours, to reuse or drop
    options["skip_instance_cache"] = True
    key = _instance_key(protocol, options, timeout_s)
    with _INSTANCES_LOCK:
        cached = _INSTANCES.get(key)
    if cached is not None:
        return cached, cached._strip_protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except Exception as err:  # unknown protocol, missing backend package, bad option
        secrets = _option_secrets(storage_options or {})
        raise StorageError(_scrub(f"{url}: cannot open storage ({safe_message(err, secrets)}); "
                                  "check the URL and storage_options", secrets)) from None
    if protocol in _S3_PROTOCOLS:
        # s3fs's retry count is a class attribute, not an option; set it on our own instance
        fs.retries = S3FS_RETRIES
    with _INSTANCES_LOCK:
        _INSTANCES[key] = fs
    return fs, path


def _instance_key(protocol: str, options: dict, timeout_s: float) -> str:
    import json

    return json.dumps([protocol, timeout_s, options], sort_keys=True, default=repr)


def _forget(fs: fsspec.AbstractFileSystem) -> None:
    """Drop a failed or abandoned instance from the reuse table."""
    with _INSTANCES_LOCK:
        for key in [k for k, v in _INSTANCES.items() if v is fs]:
            del _INSTANCES[key]


def _configured_endpoint(fs: fsspec.AbstractFileSystem, url: str) -> str | None:
    client_kwargs = getattr(fs, "client_kwargs", None) or {}
    endpoint = client_kwargs.get("endpoint_url") or getattr(fs, "endpoint_url", None)
    if not endpoint and _protocol(url) in _S3_PROTOCOLS:
        # botocore's own variables, used when storage_options name no endpoint
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return str(endpoint) if endpoint else None


def _endpoint(fs: fsspec.AbstractFileSystem, url: str) -> str:
    """Where the storage lives, for messages (never with user:password in it)."""
    endpoint = _configured_endpoint(fs, url)
    if not endpoint:
        return "the default AWS endpoint" if _protocol(url) in _S3_PROTOCOLS else f"{_protocol(url)} storage"
    try:
        parts = urlsplit(endpoint)
        netloc = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
    except ValueError:  # a malformed port: say which host at least
        return urlsplit(endpoint).hostname or "the configured endpoint"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _release(fs: fsspec.AbstractFileSystem) -> None:
    """Close an abandoned s3fs instance's connections so its stuck request ends too.

    The instance is ours alone (skip_instance_cache). s3fs keeps the client context in the private
    `_s3creator`; closing it on the filesystem's own loop aborts a request that would otherwise
    wait for an answer forever (the 100-continue case). Best effort: nothing here may raise.
    """
    creator = getattr(fs, "_s3creator", None)
    if creator is None:
        return
    try:
        loop = fs.loop
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(creator.__aexit__(None, None, None), loop)
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------
# Deadlines


class _Overdue(Exception):
    """The operation did not finish (or make progress) within its allowance."""


class _Watch:
    """Deadline shared with a worker: `progress()` restarts it, `abandoned` tells the worker to stop."""

    def __init__(self, allowance_s: float):
        self.abandoned = threading.Event()
        self._allowance_s = allowance_s
        self._last_progress = time.monotonic()

    def progress(self, allowance_s: float | None = None) -> None:
        if allowance_s is not None:
            self._allowance_s = allowance_s
        self._last_progress = time.monotonic()

    def seconds_left(self) -> float:
        return max(0.0, self._last_progress + self._allowance_s - time.monotonic())


class _ProgressCallback(Callback):
    """fsspec transfer callback: each finished part counts as progress."""

    def __init__(self, watch: _Watch):
        super().__init__()
        self._watch = watch

    def call(self, *args, **kwargs):
        self._watch.progress()


def _run_watched(work: Callable[[_Watch], Any], allowance_s: float,
                 on_abandon: Callable[[], None] = lambda: None) -> Any:
    """Run work(watch) in a daemon thread; raise _Overdue once it is quiet past its allowance.

    A daemon thread (not an executor) because an abandoned one may stay blocked, and must
    neither hold up the caller nor the interpreter's exit.
    """
    watch = _Watch(allowance_s)
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def runner() -> None:
        try:
            outcome["value"] = work(watch)
        except BaseException as err:  # handed to the caller's thread below
            outcome["error"] = err
        finally:
            finished.set()

    threading.Thread(target=runner, name="storage-op", daemon=True).start()
    while not finished.wait(watch.seconds_left()):
        if watch.seconds_left() <= 0:
            watch.abandoned.set()
            on_abandon()
            raise _Overdue()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _transfer_allowance(timeout_s: float, nbytes: int, bytes_per_s: int = MIN_BYTES_PER_S) -> float:
    return timeout_s + nbytes / bytes_per_s


# ---------------------------------------------------------------------------------------------
# Failures


def _is_timeout(err: BaseException) -> bool:
    if isinstance(err, (_Overdue, TimeoutError)):  # FSTimeoutError and socket.timeout included
        return True
    try:
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
    except ImportError:
        return False
    return isinstance(err, (ConnectTimeoutError, ReadTimeoutError))


def _is_unreachable(err: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:
        BotoConnectionError = ()  # noqa: N806
    return isinstance(err, (ConnectionError, BotoConnectionError))


def _reason_and_fix(err: BaseException, timeout_s: float, endpoint: str, secrets: list[str],
                    writing: bool, bucket: str, what: str) -> str:
    if _is_timeout(err):
        return f"storage not reachable within {timeout_s:g} s ({endpoint}); {_TIMEOUT_FIX}"
    if _is_unreachable(err):
        # refused or unresolvable: waiting longer would not help
        return f"storage not reachable ({endpoint}: {safe_message(err, secrets)}); check the endpoint and network"
    if writing and isinstance(err, FileNotFoundError):
        # writing a new key never needs it to exist: what is missing is the bucket itself
        return f"bucket {bucket} does not exist; create it or pick another {what}"
    if isinstance(err, FileNotFoundError):
        return "not found; check the URL"
    if isinstance(err, PermissionError):
        return (f"access denied ({safe_message(err, secrets)}); check the credentials "
                "(AWS_* environment or storage_options) and the bucket policy")
    return f"{safe_message(err, secrets)}; check the URL, credentials and endpoint ({endpoint})"


def _failure(action: str, url: str, err: BaseException, *, fs: fsspec.AbstractFileSystem,
             path: str, storage_options: dict | None, timeout_s: float, writing: bool = False,
             what: str = "location") -> StorageError:
    secrets = _option_secrets(storage_options or {}) + _env_secrets()
    reason = _reason_and_fix(err, timeout_s, _endpoint(fs, url), secrets, writing,
                             path.split("/")[0], what)
    message = f"{action} {url}: {reason}"
    return StorageError(_scrub(" ".join(message.split()), secrets))


def _remote(action: str, url: str, storage_options: dict | None, timeout_s: float,
            work: Callable[[fsspec.AbstractFileSystem, str, _Watch], Any], *,
            allowance_s: float | None = None, writing: bool = False, what: str = "location") -> Any:
    """Run one remote operation under a deadline; any failure becomes a one-line StorageError."""
    fs, path = filesystem(url, storage_options, timeout_s)
    try:
        return _run_watched(lambda watch: work(fs, path, watch),
                            timeout_s if allowance_s is None else allowance_s,
                            on_abandon=lambda: (_forget(fs), _release(fs)))
    except StorageError:
        _forget(fs)
        raise
    except (Exception, asyncio.CancelledError) as err:  # CancelledError is no Exception since 3.8
        _forget(fs)
        raise _failure(action, url, err, fs=fs, path=path, storage_options=storage_options,
                       timeout_s=timeout_s, writing=writing, what=what) from None


def _local_failure(action: str, url: str, err: OSError, fix: str) -> StorageError:
    reason = err.strerror or safe_message(err)
    return StorageError(f"{action} {url}: {reason}; {fix}")


# ---------------------------------------------------------------------------------------------
# Local files


def _current_umask() -> int:
    """The process umask without changing it where Linux can tell (os.umask can only swap it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # swap in a strict mask for the instant it takes, so concurrent file creation stays private
    with _umask_lock:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def _normal_file_mode() -> int:
    """What open() would have given a new file (mkstemp makes it 0o600)."""
    return 0o666 & ~_current_umask()


def _write_local_atomically(path: str, fill: Callable[[io.BufferedWriter], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # a unique temp name in the target folder: same filesystem, so os.replace is atomic, and
    # concurrent writers of the same target never share a temp file
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, _normal_file_mode())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _copy_file_into(local_path: str) -> Callable[[io.BufferedWriter], None]:
    def fill(out: io.BufferedWriter) -> None:
        with open(local_path, "rb") as source:
            while chunk := source.read(UPLOAD_PART_BYTES):
                out.write(chunk)
    return fill


# ---------------------------------------------------------------------------------------------
# Public operations


def check_writable(url: str, storage_options: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                   what: str = "out") -> None:
    """Fail early, in one line, when the folder `url` cannot take new files (within timeout_s)."""
    _check_timeout(timeout_s)
    if not is_remote(url):
        _check_local_writable(url, what)
        return

    def probe(fs, path, watch):
        name = join(path, f".write-probe-{uuid.uuid4().hex}")
        fs.pipe_file(name, b"")
        fs.rm_file(name)

    _remote(what, url, storage_options, timeout_s, probe, writing=True, what=what)


def _check_local_writable(url: str, what: str) -> None:
    folder = _local_path(url)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise _local_failure(what, url, err, _LOCAL_WRITE_FIX) from None


def write_bytes(url: str, data: bytes, storage_options: dict | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Atomically replace the file/object at `url` with `data` (readers never see a partial one)."""
    _check_timeout(timeout_s)
    if not is_remote(url):
        try:
            _write_local_atomically(_local_path(url), lambda out: out.write(data))
        except OSError as err:
            raise _local_failure("write", url, err, _LOCAL_WRITE_FIX) from None
        return

    def upload(fs, path, watch):
        partial = f"{path}.partial-{uuid.uuid4().hex}"
        _publish(fs, partial, path, watch, lambda: fs.pipe_file(partial, data), len(data), timeout_s)

    _remote("write", url, storage_options, timeout_s, upload,
            allowance_s=_transfer_allowance(timeout_s, len(data)), writing=True)


def put_file(local_path: str, url: str, storage_options: dict | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Atomically copy a (big) local file to `url`; the deadline applies per uploaded part."""
    _check_timeout(timeout_s)
    try:
        size = os.path.getsize(local_path)
    except OSError as err:
        raise _local_failure("upload", local_path, err, "pass an existing local file") from None
    if not is_remote(url):
        try:
            _write_local_atomically(_local_path(url), _copy_file_into(local_path))
        except OSError as err:
            raise _local_failure("copy to", url, err, _LOCAL_WRITE_FIX) from None
        return

    def upload(fs, path, watch):
        partial = f"{path}.partial-{uuid.uuid4().hex}"
        extra = ({"chunksize": UPLOAD_PART_BYTES, "max_concurrency": UPLOAD_PARTS_IN_FLIGHT}
                 if _protocol(url) in _S3_PROTOCOLS else {})

        def send() -> None:
            fs.put_file(local_path, partial, callback=_ProgressCallback(watch), **extra)

        _publish(fs, partial, path, watch, send, size, timeout_s)

    batch = min(size, UPLOAD_PART_BYTES * UPLOAD_PARTS_IN_FLIGHT)
    _remote("upload to", url, storage_options, timeout_s, upload,
            allowance_s=_transfer_allowance(timeout_s, batch), writing=True)


def _publish(fs, partial: str, path: str, watch: _Watch, send: Callable[[], None], size: int,
             timeout_s: float) -> None:
    """Upload under a unique partial key, then copy it to the final key and drop the partial.

    Object stores have no rename; the copy makes the final key appear complete in one step.
    """
    try:
        send()
        if watch.abandoned.is_set():
            return  # the caller already reported a failure: do not publish behind its back
        watch.progress(_transfer_allowance(timeout_s, size, MIN_COPY_BYTES_PER_S))
        fs.cp_file(partial, path)
    finally:
        if not watch.abandoned.is_set():
            _remove_quietly(fs, partial)


def _remove_quietly(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except Exception:  # cleanup of a temp key: the original failure (if any) is what matters
        pass


def read_bytes(url: str, storage_options: dict | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes | None:
    """The whole content of `url` (meant for small files), or None when it does not exist."""
    _check_timeout(timeout_s)
    if not is_remote(url):
        try:
            with open(_local_path(url), "rb") as source:
                return source.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _local_failure("read", url, err, "check the path and its permissions") from None

    def download(fs, path, watch):
        try:
            size = fs.info(path).get("size") or 0
            # the size is known now: allow the transfer time it needs
            watch.progress(_transfer_allowance(timeout_s, size))
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    return _remote("read", url, storage_options, timeout_s, download)


def exists(url: str, storage_options: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True when a file/object is at `url`; unreachable storage is an error, not False."""
    _check_timeout(timeout_s)
    if not is_remote(url):
        return os.path.exists(_local_path(url))

    def look(fs, path, watch):
        # info, not fs.exists: some backends' exists() answers False for any error
        try:
            fs.info(path)
            return True
        except FileNotFoundError:
            return False

    return _remote("look up", url, storage_options, timeout_s, look)


def list_names(url: str, storage_options: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """The names (not paths) of the files/objects directly under the folder `url`, sorted; a
    missing folder is empty. One LIST instead of a lookup per name."""
    _check_timeout(timeout_s)
    if not is_remote(url):
        try:
            return sorted(os.listdir(_local_path(url)))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise _local_failure("list", url, err, "check the path and its permissions") from None

    def listing(fs, path, watch):
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return []

    return _remote("list", url, storage_options, timeout_s, listing)


def move(source: str, target: str, storage_options: dict | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Move one file/object to another name on the same storage (object stores: copy then
    delete, so readers of `target` only ever see the whole object), bounded in time."""
    _check_timeout(timeout_s)
    if not is_remote(source):
        try:
            os.replace(_local_path(source), _local_path(target))
        except OSError as err:
            raise _local_failure("move", source, err, "check the paths and their permissions") from None
        return
    _, target_path = filesystem(target, storage_options, timeout_s)

    def relocate(fs, path, watch):
        size = fs.info(path).get("size") or 0
        watch.progress(_transfer_allowance(timeout_s, size, MIN_COPY_BYTES_PER_S))
        fs.mv(path, target_path)

    _remote("move", source, storage_options, timeout_s, relocate, writing=True)


def is_temporary(name: str) -> bool:
    """A name this module writes before the move into place: `<target>.partial-<hex>` remotely,
    `.<target>.<random>.partial` locally. One left behind means its writer died mid-write."""
    return ".partial-" in name or (name.startswith(".") and name.endswith(".partial"))


def sweep_temporaries(folder: str, storage_options: dict | None = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Delete the temporaries directly under `folder` left by writers that died mid-write; call
    it only when no writer of this folder is running (a job's driver before or after its
    workers). Returns the names removed."""
    gone = [name for name in list_names(folder, storage_options, timeout_s) if is_temporary(name)]
    for name in gone:
        remove(join(folder, name), storage_options, timeout_s)
    return gone


def remove(url: str, storage_options: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Delete the file/object at `url`; a missing one is fine."""
    _check_timeout(timeout_s)
    if not is_remote(url):
        try:
            os.remove(_local_path(url))
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _local_failure("remove", url, err, "check the path and its permissions") from None
        return

    def delete(fs, path, watch):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    _remote("remove", url, storage_options, timeout_s, delete, writing=True)


def open_reader(url: str, storage_options: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A binary file object for streaming reads of `url`; missing or unreachable -> StorageError.

    Opening is bounded by timeout_s; each later read is one or more ranged GETs, each bounded by
    the per-request timeouts (no body to send, so aiohttp's read timer does apply).
    """
    _check_timeout(timeout_s)
    if not is_remote(url):
        try:
            return open(_local_path(url), "rb")
        except OSError as err:
            raise _local_failure("open", url, err, "check the path and its permissions") from None

    def start(fs, path, watch):
        return fs, path, fs.open(path, "rb")

    fs, path, handle = _remote("open", url, storage_options, timeout_s, start)
    return _SafeReader(handle, lambda err: _failure("read", url, err, fs=fs, path=path,
                                                    storage_options=storage_options,
                                                    timeout_s=timeout_s))


class _SafeReader(io.RawIOBase):
    """A remote file whose read errors come out as one-line StorageErrors, like everything here."""

    def __init__(self, inner, to_storage_error: Callable[[BaseException], StorageError]):
        super().__init__()
        self._inner = inner
        self._to_storage_error = to_storage_error

    def _guarded(self, method: Callable, *args):
        try:
            return method(*args)
        except StorageError:
            raise
        except Exception as err:
            raise self._to_storage_error(err) from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()

    def read(self, size: int = -1) -> bytes:
        return self._guarded(self._inner.read, size)

    def readinto(self, buffer) -> int:
        return self._guarded(self._inner.readinto, buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._guarded(self._inner.seek, offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def close(self) -> None:
        try:
            if not self.closed:
                self._inner.close()
        finally:
            super().close()

    def __getattr__(self, name: str):
        # anything else a reader may look at (name, size, details) comes from the wrapped file
        if name == "_inner":  # not set yet (during __init__): no wrapped file to ask
            raise AttributeError(name)
        return getattr(self._inner, name)
