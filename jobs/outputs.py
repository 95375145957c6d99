"""Where a video job's files go: one output folder (local path or fsspec URL).

    out/job.json                     the spec (credentials redacted) and its fingerprint, written first
    out/segments/00000.mp4 ...       each segment's frames as soon as they are final (each playable)
    out/checkpoint/state.safetensors what a killed run resumes from (one object: atomic)
    out/video.mp4                    the whole video, the segment files joined without re-encoding
    out/stats.json                   written last: its presence means the job is complete

Every file is written under a unique temporary name and moved into place (`jobs.storage`), so a
reader never sees half a file and two writers never share a temporary.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np

from jobs import storage
from jobs.runner import RunFault, RunState
from jobs.spec import JobSpec

SEGMENT_DIGITS = 5


class VideoFolder:
    """The output folder of one video job: segment writer, checkpoint store, final set."""

    def __init__(self, spec: JobSpec, fps: int, out: str | None = None):
        self.spec = spec
        self.root = (out or spec.out).rstrip("/")
        self.options = spec.storage_options
        self.timeout = spec.storage_timeout_s
        self.fps = fps
        self._found: set[str] | None = None     # segment files present when the run started

    def _segment_names(self) -> set[str]:
        """Listed once: a segment this run writes is recorded as it is written, so per-segment
        lookups cost no storage round trip."""
        if self._found is None:
            self._found = set(storage.list_names(self.path("segments"), self.options, self.timeout))
        return self._found

    # -- paths -----------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def segment_path(self, index: int) -> str:
        return self.path("segments", f"{index:0{SEGMENT_DIGITS}d}.mp4")

    # -- the job manifest ------------------------------------------------------------------------
    def claim(self) -> bool:
        """Write job.json, or check the one there: True when the folder already holds this job.
        Another spec's folder is refused, naming what differs."""
        found = storage.read_bytes(self.path("job.json"), self.options, self.timeout)
        if found is None:
            manifest = {"fingerprint": self.spec.fingerprint(), "spec": self.spec.to_dict(redacted=True)}
            storage.write_bytes(self.path("job.json"), json.dumps(manifest, indent=1).encode(),
                                self.options, self.timeout)
            return False
        try:
            manifest = json.loads(found)
            fingerprint, other = manifest["fingerprint"], manifest["spec"]
        except (ValueError, KeyError, TypeError):
            raise RunFault(f"out {self.root}: job.json is not a job manifest; pick an empty out folder") from None
        if fingerprint != self.spec.fingerprint():
            diff = "; ".join(self.spec.differences(other)[:4]) or "model files or defaults changed"
            raise RunFault(f"out {self.root} holds a job with another spec ({diff}); resume it with the same "
                           f"spec, or choose another out folder")
        return True

    def sweep(self) -> list[str]:
        """Temporaries a killed writer left (call only while no writer of this job runs)."""
        return [name for parts in ((), ("segments",), ("checkpoint",))
                for name in storage.sweep_temporaries(self.path(*parts) if parts else self.root,
                                                      self.options, self.timeout)]

    def is_complete(self) -> bool:
        return storage.exists(self.path("stats.json"), self.options, self.timeout)

    # -- segments (SegmentWriter) ----------------------------------------------------------------
    def has_segment(self, index: int) -> bool:
        return self.segment_path(index).rsplit("/", 1)[-1] in self._segment_names()

    def write_segment(self, index: int, frames: np.ndarray) -> None:
        from jobs.video import encode_mp4

        with tempfile.TemporaryDirectory(prefix="scope-segment-") as tmp:
            local = os.path.join(tmp, "segment.mp4")
            encode_mp4(frames, local, fps=self.fps)
            storage.put_file(local, self.segment_path(index), self.options, self.timeout)
        self._segment_names().add(self.segment_path(index).rsplit("/", 1)[-1])

    # -- checkpoints (CheckpointStore) -----------------------------------------------------------
    def load(self) -> RunState | None:
        where = self.path("checkpoint", "state.safetensors")
        data = storage.read_bytes(where, self.options, self.timeout)
        return None if data is None else RunState.from_bytes(data, where)

    def save(self, state: RunState) -> None:
        storage.write_bytes(self.path("checkpoint", "state.safetensors"), state.to_bytes(self.spec.seed),
                            self.options, self.timeout)

    # -- the final set ---------------------------------------------------------------------------
    def assemble(self, expected: list[int], target: str | None = None) -> int:
        """Join the segment files `expected` (the segments that hold frames, in order) into one
        mp4 (`target`, default out/video.mp4) by stream copy, reading one segment at a time;
        returns the frame count. A missing one is an error, never a shorter video."""
        from jobs.video import concat_mp4

        missing = [i for i in expected if not self.has_segment(i)]
        if missing:
            raise RunFault(f"out {self.root}: segment file(s) {missing[:5]} are missing, so the video would "
                           f"be incomplete; delete {self.path('checkpoint')} to generate them again")
        sources = [self.segment_path(i) for i in expected]
        if not sources:
            raise RunFault(f"out {self.root}: no segment files to join; the video has no frames")
        target = target or self.path("video.mp4")
        opener = self._read_whole   # one GET per segment: PyAV's small seeks would each be a ranged GET
        if not storage.is_remote(target):
            return concat_mp4(sources, target.removeprefix("file://"), opener=opener)
        with tempfile.TemporaryDirectory(prefix="scope-video-") as tmp:
            local = os.path.join(tmp, "video.mp4")
            frames = concat_mp4(sources, local, opener=opener)
            storage.put_file(local, target, self.options, self.timeout)
        return frames

    def _read_whole(self, url: str) -> io.BytesIO:
        data = storage.read_bytes(url, self.options, self.timeout)
        if data is None:
            raise RunFault(f"segment file {url} vanished while the video was being joined; run the job again")
        return io.BytesIO(data)

    def write_stats(self, stats: dict[str, Any], target: str | None = None) -> None:
        from jobs.runner import dumps_stats

        storage.write_bytes(target or self.path("stats.json"), dumps_stats(stats), self.options, self.timeout)
