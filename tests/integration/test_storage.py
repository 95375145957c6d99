"""jobs.storage against a real S3 API (moto server) and against an endpoint that never answers."""
from __future__ import annotations

import os
import socket
import time
import uuid

import pytest
import s3fs

from jobs import storage
from jobs.storage import StorageError

pytestmark = pytest.mark.integration

SECRET_KEY_ID = "AKIATESTSECRETKEY123"
SECRET = "verysecretvalue"


@pytest.fixture
def bucket(s3_options):
    name = f"storage-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options, skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture
def silent_options(silent_endpoint):
    return {"key": SECRET_KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": silent_endpoint}}


def _keys(s3_options, prefix: str) -> list[str]:
    fs = s3fs.S3FileSystem(**s3_options, skip_instance_cache=True)
    return sorted(path.rsplit("/", 1)[-1] for path in fs.find(prefix))


def test_round_trip(s3_options, bucket, tmp_path):
    out = f"s3://{bucket}/run"
    storage.check_writable(out, s3_options)
    url = storage.join(out, "progress.json")
    assert storage.read_bytes(url, s3_options) is None and not storage.exists(url, s3_options)
    storage.write_bytes(url, b'{"done": 1}', s3_options)
    storage.write_bytes(url, b'{"done": 2}', s3_options)
    assert storage.read_bytes(url, s3_options) == b'{"done": 2}'
    assert storage.exists(url, s3_options)

    # big enough for a multipart upload (parts of UPLOAD_PART_BYTES)
    source = tmp_path / "video.bin"
    source.write_bytes(os.urandom(2 * storage.UPLOAD_PART_BYTES + 12345))
    video = storage.join(out, "video.bin")
    storage.put_file(str(source), video, s3_options)
    with storage.open_reader(video, s3_options) as reader:
        reader.seek(storage.UPLOAD_PART_BYTES)
        assert reader.read(1000) == source.read_bytes()[storage.UPLOAD_PART_BYTES:][:1000]
    assert _keys(s3_options, f"{bucket}/run") == ["progress.json", "video.bin"]  # no partials, no probes

    storage.remove(video, s3_options)
    storage.remove(video, s3_options)  # missing is fine
    assert not storage.exists(video, s3_options)


def test_missing_object_reads_as_none_and_opens_as_error(s3_options, bucket):
    assert storage.read_bytes(f"s3://{bucket}/nope.json", s3_options) is None
    with pytest.raises(StorageError, match=r"nope.bin: not found; check the URL"):
        storage.open_reader(f"s3://{bucket}/nope.bin", s3_options)


def test_missing_bucket_is_named(s3_options):
    missing = f"no-such-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StorageError) as caught:
        storage.check_writable(f"s3://{missing}/out", s3_options, what="out")
    assert str(caught.value) == (f"out s3://{missing}/out: bucket {missing} does not exist; "
                                 "create it or pick another out")


def test_options_are_not_changed(s3_options, bucket):
    before = repr(s3_options)
    storage.write_bytes(f"s3://{bucket}/a", b"x", s3_options, timeout_s=3)
    assert repr(s3_options) == before


def test_silent_endpoint_fails_check_writable_in_time(silent_endpoint, silent_options):
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.check_writable("s3://bucket/out", silent_options, timeout_s=2)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert elapsed < 6, f"took {elapsed:.1f} s"
    assert message == (f"out s3://bucket/out: storage not reachable within 2 s ({silent_endpoint}); "
                       "check the endpoint and network, or raise storage_timeout_s")
    assert SECRET not in message and SECRET_KEY_ID not in message


@pytest.mark.parametrize("operation", ["write_bytes", "put_file", "read_bytes", "exists", "remove",
                                       "open_reader"])
def test_silent_endpoint_fails_every_operation_in_time(silent_endpoint, silent_options, tmp_path,
                                                       operation):
    source = tmp_path / "v.bin"
    source.write_bytes(b"v" * 1000)
    url = "s3://bucket/out/v.bin"
    calls = {
        "write_bytes": lambda: storage.write_bytes(url, b"data", silent_options, timeout_s=2),
        "put_file": lambda: storage.put_file(str(source), url, silent_options, timeout_s=2),
        "read_bytes": lambda: storage.read_bytes(url, silent_options, timeout_s=2),
        "exists": lambda: storage.exists(url, silent_options, timeout_s=2),
        "remove": lambda: storage.remove(url, silent_options, timeout_s=2),
        "open_reader": lambda: storage.open_reader(url, silent_options, timeout_s=2),
    }
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"not reachable within 2 s \\({silent_endpoint}\\)") as caught:
        calls[operation]()
    assert time.monotonic() - started < 6
    assert SECRET not in str(caught.value) and SECRET_KEY_ID not in str(caught.value)


def test_refused_endpoint_fails_fast(s3_options):
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # nothing listens here once closed
    options = {**s3_options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    started = time.monotonic()
    # refused at once; under load botocore's retry backoff may run into the deadline instead,
    # which is the same failure said another way
    with pytest.raises(StorageError, match=f"storage not reachable.*http://127.0.0.1:{port}"):
        storage.write_bytes("s3://bucket/a", b"x", options, timeout_s=5)
    assert time.monotonic() - started < 8


def test_list_names_on_s3(s3_options):
    import uuid

    import s3fs

    from jobs.storage import list_names, write_bytes

    bucket = f"list-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**s3_options).mkdir(bucket)
    assert list_names(f"s3://{bucket}/segments", s3_options) == []
    for name in ("00001.mp4", "00000.mp4"):
        write_bytes(f"s3://{bucket}/segments/{name}", b"x", s3_options)
    assert list_names(f"s3://{bucket}/segments", s3_options) == ["00000.mp4", "00001.mp4"]


def test_generate_commits_video_and_stats_to_s3_as_a_set(s3_options, tmp_path):
    import json

    import yaml

    from jobs.cli import main

    bucket = f"gen-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**s3_options).mkdir(bucket)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"prompt": "a test", "frames": 9, "model": "tiny", "steps": 2,
                                    "storage_options": s3_options}))
    rc = main(["generate", "--spec", str(spec), "--out", f"s3://{bucket}/v.mp4", "--stats",
               f"s3://{bucket}/s.json", "--no-progress"])
    assert rc == 0
    fs = s3fs.S3FileSystem(**s3_options, skip_instance_cache=True)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(bucket)) == ["s.json", "v.mp4"]   # no temporaries
    assert json.loads(fs.cat_file(f"{bucket}/s.json"))["frames"] == 9
