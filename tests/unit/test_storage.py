"""jobs.storage without servers: local folders, memory:// as a remote, deadlines, no leaked secrets."""
from __future__ import annotations

import os
import stat
import threading
import time

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from jobs import storage
from jobs.storage import StorageError

SECRET_KEY_ID = "AKIATESTSECRETKEY123"
SECRET = "verysecretvalue"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@pytest.fixture
def memory_root():
    """A unique memory:// folder, emptied afterwards (the memory store is process-wide)."""
    root = f"memory://storage-test-{time.monotonic_ns()}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://"):]
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(".")]


# --- URLs -------------------------------------------------------------------------------------


def test_is_remote():
    assert storage.is_remote("s3://bucket/prefix")
    assert storage.is_remote("memory://x")
    assert not storage.is_remote("/tmp/out")
    assert not storage.is_remote("out/video.mp4")
    assert not storage.is_remote("file:///tmp/out")


def test_join():
    assert storage.join("s3://b/x", "a", "b.json") == "s3://b/x/a/b.json"
    assert storage.join("s3://b/x/", "/a/", "b") == "s3://b/x/a/b"
    assert storage.join("/tmp/out", "v.mp4") == "/tmp/out/v.mp4"
    assert storage.join("/", "v") == "/v"
    assert storage.join("", "a", "", "b") == "a/b"


# --- local files ------------------------------------------------------------------------------


def test_write_bytes_is_atomic_with_normal_permissions(tmp_path, umask_027):
    target = tmp_path / "sub" / "result.json"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask_027
    assert _leftovers(target.parent) == []


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    target = tmp_path / "shared.bin"
    contents = {name: name.encode() * 200_000 for name in ("a", "b")}

    def writer(data: bytes) -> None:
        for _ in range(15):
            storage.write_bytes(str(target), data)

    threads = [threading.Thread(target=writer, args=(data,)) for data in contents.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_bytes() in contents.values()
    assert _leftovers(tmp_path) == []


def test_put_file_copies_locally(tmp_path, umask_027):
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(300_000))
    target = tmp_path / "out" / "copy.bin"
    storage.put_file(str(source), str(target))
    assert target.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask_027
    assert _leftovers(target.parent) == []


def test_put_file_names_a_missing_source(tmp_path):
    with pytest.raises(StorageError, match="nope.bin: No such file"):
        storage.put_file(str(tmp_path / "nope.bin"), str(tmp_path / "copy.bin"))


def test_read_exists_remove(tmp_path):
    target = str(tmp_path / "a.txt")
    assert storage.read_bytes(target) is None
    assert not storage.exists(target)
    storage.write_bytes(target, b"hello")
    assert storage.exists(target)
    assert storage.read_bytes(target) == b"hello"
    with storage.open_reader(target) as reader:
        assert reader.read() == b"hello"
    storage.remove(target)
    storage.remove(target)  # missing is fine
    assert not storage.exists(target)


def test_file_urls_are_local(tmp_path):
    target = f"file://{tmp_path}/b.txt"
    storage.write_bytes(target, b"x")
    assert (tmp_path / "b.txt").read_bytes() == b"x"
    assert storage.read_bytes(target) == b"x"


def test_open_reader_on_missing_file_is_one_line(tmp_path):
    with pytest.raises(StorageError, match="No such file"):
        storage.open_reader(str(tmp_path / "missing.bin"))


def test_check_writable_creates_the_folder(tmp_path):
    folder = tmp_path / "new" / "out"
    storage.check_writable(str(folder))
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_check_writable_on_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for folder in (locked, locked / "sub"):
            with pytest.raises(StorageError) as caught:
                storage.check_writable(str(folder), what="out")
            message = str(caught.value)
            assert message.startswith(f"out {folder}: Permission denied;")
            assert "\n" not in message
    finally:
        locked.chmod(0o700)


# --- memory:// as a remote store (no network) -------------------------------------------------


def test_remote_round_trip_on_memory(memory_root, tmp_path):
    url = storage.join(memory_root, "out", "a.json")
    storage.check_writable(storage.join(memory_root, "out"))
    storage.write_bytes(url, b"payload")
    assert storage.read_bytes(url) == b"payload"
    assert storage.exists(url)
    source = tmp_path / "video.mp4"
    source.write_bytes(b"v" * 10_000)
    video = storage.join(memory_root, "out", "video.mp4")
    storage.put_file(str(source), video)
    with storage.open_reader(video) as reader:
        reader.seek(5)
        assert reader.read(3) == b"vvv"
    fs = fsspec.filesystem("memory")
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(memory_root[len("memory://"):] + "/out", detail=False)]
    assert sorted(names) == ["a.json", "video.mp4"]  # no partial objects, no probes
    storage.remove(url)
    storage.remove(url)
    assert storage.read_bytes(url) is None and not storage.exists(url)


def test_stalled_remote_write_fails_in_time_and_publishes_nothing(memory_root, monkeypatch):
    release = threading.Event()
    real_pipe_file = MemoryFileSystem.pipe_file

    def stalled_pipe_file(self, path, value, **kwargs):
        release.wait(30)  # an endpoint that never answers
        return real_pipe_file(self, path, value, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", stalled_pipe_file)
    url = storage.join(memory_root, "a.json")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"^write memory://.*: storage not reachable within 0.5 s"):
        storage.write_bytes(url, b"late", timeout_s=0.5)
    assert time.monotonic() - started < 3
    release.set()
    time.sleep(0.3)  # let the abandoned upload finish: it must not publish the final key
    assert not fsspec.filesystem("memory").exists(url[len("memory://"):])


def test_remote_failure_is_one_line_without_secrets(memory_root, monkeypatch):
    def denied(self, path, value, **kwargs):
        raise PermissionError(f"denied for {SECRET_KEY_ID} / {SECRET}\nTraceback details")

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", denied)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    with pytest.raises(StorageError) as caught:
        storage.check_writable(memory_root, storage_options={"key": SECRET_KEY_ID, "secret": SECRET})
    message = str(caught.value)
    assert message.startswith(f"out {memory_root}: access denied (denied for *** / ***);")
    assert SECRET not in message and SECRET_KEY_ID not in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_timeout_must_be_positive(tmp_path):
    with pytest.raises(StorageError, match="not positive"):
        storage.write_bytes(str(tmp_path / "x"), b"", timeout_s=0)


# --- filesystems ------------------------------------------------------------------------------


def test_s3_filesystem_gets_timeouts_without_touching_the_callers_options():
    options = {"key": "k", "secret": "s", "config_kwargs": {"read_timeout": 99},
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    before = repr(options)
    fs, path = storage.filesystem("s3://bucket/prefix", options, timeout_s=3)
    assert path == "bucket/prefix"
    assert repr(options) == before
    assert fs.config_kwargs["connect_timeout"] == 3
    assert fs.config_kwargs["read_timeout"] == 99  # the user's choice wins
    assert fs.config_kwargs["retries"]["max_attempts"] == storage.S3_MAX_ATTEMPTS
    assert fs.retries == storage.S3FS_RETRIES
    other, _ = storage.filesystem("s3://bucket/prefix", options, timeout_s=4)
    assert other is not fs and other.config_kwargs["connect_timeout"] == 4


def test_unknown_protocol_is_one_line():
    with pytest.raises(StorageError, match=r"^nosuchproto://x: cannot open storage .*; check the URL"):
        storage.filesystem("nosuchproto://x")


# --- secrets ----------------------------------------------------------------------------------


def test_redact_nested_options(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    options = {"key": SECRET_KEY_ID, "secret": SECRET, "anon": False,
               "client_kwargs": {"endpoint_url": "http://h:1", "aws_session_token": "t0ken"},
               "list": [{"password": "pw-value"}, "uses env-secret-value here"]}
    redacted = storage.redact(options)
    assert redacted == {"key": "***", "secret": "***", "anon": False,
                        "client_kwargs": {"endpoint_url": "http://h:1", "aws_session_token": "***"},
                        "list": [{"password": "***"}, "uses *** here"]}
    assert options["secret"] == SECRET and options["list"][0]["password"] == "pw-value"
    assert storage.redact("plain text") == "plain text"


def test_safe_message_removes_secrets_and_extra_lines(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    err = OSError(f"bad request {SECRET_KEY_ID} env-secret-value {SECRET} " + "x" * 300 + "\nsecond line")
    message = storage.safe_message(err, secrets=[SECRET])
    assert message.startswith("bad request *** *** *** x")
    assert len(message) <= storage.MESSAGE_MAX_CHARS and "\n" not in message
    assert storage.safe_message(TimeoutError()) == "TimeoutError"


def test_list_names_lists_a_folder_once_and_a_missing_one_is_empty(tmp_path):
    from jobs.storage import list_names, write_bytes

    assert list_names(str(tmp_path / "absent")) == []
    for name in ("b.mp4", "a.mp4"):
        write_bytes(str(tmp_path / "segs" / name), b"x")
    assert list_names(str(tmp_path / "segs")) == ["a.mp4", "b.mp4"]


def test_sweep_removes_only_temporaries_left_by_killed_writers(tmp_path):
    from jobs import storage

    (tmp_path / "a.mp4").write_bytes(b"done")
    (tmp_path / ".a.mp4.x1y2.partial").write_bytes(b"half")           # local temp of a killed write
    (tmp_path / "b.mp4.partial-0123abcd").write_bytes(b"half")        # remote-style temp key
    (tmp_path / "partial-notes.txt").write_bytes(b"keep")
    gone = storage.sweep_temporaries(str(tmp_path))
    assert sorted(gone) == [".a.mp4.x1y2.partial", "b.mp4.partial-0123abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "partial-notes.txt"]
    assert storage.sweep_temporaries(str(tmp_path / "missing")) == []
