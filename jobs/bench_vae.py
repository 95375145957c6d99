"""`python -m jobs.bench_vae`: streamed vs one-shot decode of a long latent video on a tiny Wan VAE.

The long-video job decodes segment by segment with `VAEStreamDecoder`; this bench shows what that buys.
For a latent video of `latent_frames` (1x) and `scale` times as many (10x) it reports:

- `max_abs_diff`: max |streamed - one-shot| over the whole video (should be ~0: the same per-frame decoder
  calls, the cache carried between chunks);
- `peak_mb`: peak resident memory above the state before decoding, each way, each length, every
  measurement in a fresh process (Linux: VmHWM after resetting it through /proc/self/clear_refs). The
  one-shot decode holds the whole video, so it grows with the length; the streamed decode holds one chunk
  plus the fixed causal cache, so it stays flat;
- `seconds` per decode and the cache size.

    .venv/bin/python -m jobs.bench_vae --latent-frames 8 --scale 10 --grid 16 16 --chunk 4
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

from pipelines.wan.vae import VAEStreamDecoder, WanVAE, WanVAEConfig, init_random_weights_

WEIGHT_SEED = 0
LATENT_SEED = 1


def make_vae(threads: int) -> WanVAE:
    """The tiny VAE with random weights (the bench measures memory and equality, not pictures)."""
    torch.set_num_threads(threads)
    return init_random_weights_(WanVAE(WanVAEConfig.named("tiny")), seed=WEIGHT_SEED).eval()


def make_latent(latent_frames: int, grid: tuple[int, int]) -> torch.Tensor:
    return torch.randn(1, 16, latent_frames, *grid, generator=torch.Generator().manual_seed(LATENT_SEED))


def decode_streamed(vae: WanVAE, latent: torch.Tensor, chunk: int, keep: bool) -> tuple[torch.Tensor | None, int]:
    """Chunks of `chunk` latent frames through one stream; (the video if `keep`, cache bytes at the end)."""
    stream = VAEStreamDecoder(vae)
    parts = []
    for start in range(0, latent.shape[2], chunk):
        frames = stream.decode_next(latent[:, :, start:start + chunk])   # [1, 3, n, H, W]
        if keep:
            parts.append(frames)
        del frames   # a writer would encode and drop the chunk here
    return (torch.cat(parts, dim=2) if keep else None), stream.cache.nbytes()


# ----------------------------------------------------------------------------- memory (fresh process each)

def _status_kb(field: str) -> int | None:
    """A /proc/self/status field in kB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(way: str, latent_frames: int, grid: tuple[int, int], chunk: int, threads: int) -> dict[str, Any]:
    """Run one decode ('streamed' or 'one_shot') in this (fresh) process; peak RSS above the start, seconds."""
    import resource

    vae = make_vae(threads)
    latent = make_latent(latent_frames, grid)
    # warm up first: the first convolutions load kernels and grow thread pools (tens of MB, once)
    decode_streamed(vae, make_latent(2, grid), chunk, keep=False)
    vae.decode(make_latent(2, grid))
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS") or 0
    if not reset:   # no reset: the lifetime peak so far is the floor (the measurement can only under-count)
        base_kb = max(base_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    started = time.perf_counter()
    if way == "streamed":
        _, cache_bytes = decode_streamed(vae, latent, chunk, keep=False)
        result = {"cache_bytes": cache_bytes}
    else:
        video = vae.decode(latent)   # the whole video is the result: it is held
        result = {"video_mb": round(video.numel() * video.element_size() / 2**20, 2)}
    seconds = time.perf_counter() - started
    peak_kb = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**result, "peak_mb": round(max(0, peak_kb - base_kb) / 1024, 2), "seconds": round(seconds, 3),
            "peak_method": "VmHWM reset" if reset else "ru_maxrss (not reset)"}


# glibc keeps freed blocks in its heap and raises its mmap threshold as big blocks are freed, so RSS
# would remember memory the program no longer holds. A fixed threshold (this also turns the adaptation
# off) gives every block of 64 KiB or more its own mapping, returned to the OS on free: RSS then follows
# the memory actually held by tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def _in_fresh_process(*args: Any) -> dict[str, Any]:
    """measure_peak(*args) in a new process started with MALLOC_ENV (the parent's environment is restored)."""
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            return pool.submit(measure_peak, *args).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------- the bench

def bench_vae(latent_frames: int = 8, scale: int = 10, grid: tuple[int, int] = (16, 16), chunk: int = 4,
              threads: int = 1) -> dict[str, Any]:
    """Streamed vs one-shot decode at 1x and `scale`x length: equality, peak memory, time (one JSON-ready dict)."""
    config = WanVAEConfig.named("tiny")
    report: dict[str, Any] = {"vae": "tiny (random weights)", "dim": config.dim, "latent_grid": list(grid),
                              "pixels": [g * config.spatial_stride for g in grid], "chunk_latent_frames": chunk,
                              "threads": threads, "lengths": {}}
    vae = make_vae(threads)
    for label, frames in (("1x", latent_frames), (f"{scale}x", latent_frames * scale)):
        latent = make_latent(frames, grid)
        one_shot = vae.decode(latent)
        streamed, _ = decode_streamed(vae, latent, chunk, keep=True)
        entry = {"latent_frames": frames, "frames": config.num_frames(frames),
                 "max_abs_diff": float((streamed - one_shot).abs().max())}
        del one_shot, streamed
        for way in ("streamed", "one_shot"):
            entry[way] = _in_fresh_process(way, frames, grid, chunk, threads)
        report["lengths"][label] = entry
    short, long = report["lengths"]["1x"], report["lengths"][f"{scale}x"]
    report["peak_growth_streamed"] = _ratio(long["streamed"]["peak_mb"], short["streamed"]["peak_mb"])
    report["peak_growth_one_shot"] = _ratio(long["one_shot"]["peak_mb"], short["one_shot"]["peak_mb"])
    return report


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_vae", description=__doc__.splitlines()[0])
    parser.add_argument("--latent-frames", type=int, default=8, help="latent frames at 1x (default 8)")
    parser.add_argument("--scale", type=int, default=10, help="the long run is this many times longer (default 10)")
    parser.add_argument("--grid", type=int, nargs=2, default=(16, 16), metavar=("H", "W"),
                        help="latent height and width (default 16 16 = 128x128 pixels)")
    parser.add_argument("--chunk", type=int, default=4, help="latent frames per streamed call (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    for name in ("latent_frames", "scale", "chunk", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.grid) < 1:
        parser.error("--grid values must be at least 1")
    report = bench_vae(args.latent_frames, args.scale, tuple(args.grid), args.chunk, args.threads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
