"""The procedural model's latent space: a fixed linear patch codec fitted in closed form.

Each non-overlapping `patch x patch x 3` pixel patch of a frame maps linearly to `channels`
latent values (PCA of patches, whitened so every channel has unit variance on the fitting
clips). No temporal compression: frame t of the video is latent frame t, and decoding is a
fixed elementwise sum per pixel, so decoding a video chunk by chunk gives the same bytes as
decoding it whole.

    frames uint8 [..., T, H, W, 3]  --encode-->  latents float32 [..., C, T, H/p, W/p]
    latents                          --decode-->  frames uint8 [..., T, H, W, 3]

Saved as `<name>.safetensors` (mean, components, scale) + `<name>.json` (patch, channels, ...).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipelines.procedural.data import ClipConfig, make_batch


def _stem(path: str | Path) -> Path:
    """Path without a .safetensors / .json suffix (other dots in the name are kept)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def _as_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    return frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))


def _combine(columns: np.ndarray, basis: np.ndarray, mean: np.ndarray, block: int = 16384) -> np.ndarray:
    """out[q, n] = mean[q] + sum_c basis[c, q] * columns[c, n] in float32, c in order.

    Elementwise multiply then add (never fused), in cache-sized blocks of n: each value is the
    same rounding sequence whatever N is.
    """
    c, n = columns.shape
    out = np.empty((basis.shape[1], n), np.float32)
    product = np.empty(block, np.float32)
    for start in range(0, n, block):
        part = columns[:, start:start + block]
        tmp = product[:part.shape[1]]
        for q in range(basis.shape[1]):
            acc = out[q, start:start + block]
            acc[...] = mean[q]
            for k in range(c):
                np.multiply(part[k], basis[k, q], out=tmp)
                acc += tmp
    return out


@dataclass
class PatchCodec:
    """Linear patch codec: latent = ((patch/255 - mean) @ components.T) / scale."""

    mean: torch.Tensor        # [P] with P = patch*patch*3, pixel values in [0, 1]
    components: torch.Tensor  # [C, P] orthonormal rows, largest variance first
    scale: torch.Tensor       # [C] std of each channel on the fitting data
    patch: int = 4

    @property
    def channels(self) -> int:
        return self.components.shape[0]

    # -- encode --------------------------------------------------------------------------------
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [..., T, H, W, 3] -> float32 latents [..., C, T, H/p, W/p] (~unit variance), on the frames' device."""
        x = _as_tensor(frames)
        if x.dtype != torch.uint8 or x.ndim < 4 or x.shape[-1] != 3:
            raise ValueError(f"encode expects uint8 frames [..., T, H, W, 3]; got {tuple(x.shape)} {x.dtype}")
        *lead, t, h, w, _ = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} must be a multiple of the patch size {p}")
        x = x.reshape(*lead, t, h // p, p, w // p, p, 3).movedim(-4, -3)        # [..., T, h, w, p, p, 3]
        x = x.reshape(*lead, t, h // p, w // p, p * p * 3).float().div_(255.0)  # [..., T, h, w, P]
        project = (self.components.T / self.scale).to(x.device)                 # [P, C]
        z = (x - self.mean.to(x.device)) @ project                               # [..., T, h, w, C]
        return z.movedim(-1, -4).contiguous()                                    # [..., C, T, h, w]

    # -- decode --------------------------------------------------------------------------------
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [..., C, T, h, w] -> float32 pixels in [0, 1] (unclipped) [..., T, H, W, 3].

        Every output value is mean[q] + sum_c basis[c, q] * z[c], evaluated as the same fixed
        sequence of float32 multiplies and adds (no matmul), so decoding a video chunk by chunk
        along T (or in any batch) gives exactly the bytes of decoding it whole.
        """
        if latents.ndim < 4 or latents.shape[-4] != self.channels:
            raise ValueError(f"decode expects latents [..., {self.channels}, T, h, w]; got {tuple(latents.shape)}")
        z = latents.detach().to("cpu", torch.float32)
        *lead, c, t, h, w = z.shape
        p = self.patch
        columns = z.movedim(-4, 0).reshape(c, -1).contiguous().numpy()           # [C, N]
        basis = (self.components * self.scale[:, None]).numpy()                 # [C, P]
        values = torch.from_numpy(_combine(columns, basis, self.mean.numpy()))  # [P, N]
        x = values.T.reshape(*lead, t, h, w, p, p, 3).movedim(-3, -4)           # [..., T, h, p, w, p, 3]
        return x.reshape(*lead, t, h * p, w * p, 3)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents [..., C, T, h, w] -> uint8 frames [..., T, H, W, 3] (numpy); chunk-invariant."""
        x = self.decode_float(latents)
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write `<path>.safetensors` and `<path>.json`."""
        path = _stem(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mean": self.mean.float().contiguous(), "components": self.components.float().contiguous(),
                   "scale": self.scale.float().contiguous()}, str(path.with_name(path.name + ".safetensors")))
        meta = {"kind": "linear_patch_codec", "patch": self.patch, "channels": self.channels,
                "latent": "[C, T, H/patch, W/patch], unit variance per channel",
                "pixels": "uint8 RGB [T, H, W, 3]"}
        path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PatchCodec:
        """Read a codec written by `save` (path with or without suffix); shapes are checked."""
        path = _stem(path)
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        tensors = load_file(str(path.with_name(path.name + ".safetensors")))
        missing = {"mean", "components", "scale"} - set(tensors)
        if missing:
            raise KeyError(f"{path}.safetensors lacks {sorted(missing)}")
        p, c = meta["patch"], meta["channels"]
        expected = {"mean": (p * p * 3,), "components": (c, p * p * 3), "scale": (c,)}
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{path}.safetensors: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {shape} for patch={p}, channels={c}")
        return cls(tensors["mean"], tensors["components"], tensors["scale"], patch=p)


def fit_codec(clips: Iterable[np.ndarray | torch.Tensor], patch: int = 4, channels: int = 16) -> PatchCodec:
    """Fit the codec by PCA on all patches of `clips` (each uint8 [..., T, H, W, 3]).

    Covariance is accumulated in float64 over the clips; component signs are fixed (largest
    absolute entry positive) so the same clips always give the same codec.
    """
    dim = patch * patch * 3
    if not 1 <= channels <= dim:
        raise ValueError(f"channels must be in [1, {dim}] for patch {patch} (e.g. 16); got {channels}")
    total = torch.zeros(dim, dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for frames in clips:
        x = _as_tensor(frames)
        *_, h, w, _ = x.shape
        x = x.reshape(-1, h // patch, patch, w // patch, patch, 3).movedim(2, 3)
        x = x.reshape(-1, dim).to(torch.float64).div(255.0)
        total += x.sum(0)
        outer += x.T @ x
        count += x.shape[0]
    if count < dim:
        raise ValueError(f"need at least {dim} patches to fit; got {count}")
    mean = total / count
    cov = outer / count - mean[:, None] * mean[None, :]
    eigvals, eigvecs = torch.linalg.eigh(cov)                   # ascending
    order = torch.argsort(eigvals, descending=True)[:channels]
    components = eigvecs[:, order].T.contiguous()              # [C, P]
    sign = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * sign
    scale = eigvals[order].clamp_min(1e-12).sqrt()
    return PatchCodec(mean.float(), components.float(), scale.float(), patch=patch)


def fit_default_codec(num_clips: int = 256, seed: int = 1234, patch: int = 4, channels: int = 16,
                      config: ClipConfig | None = None) -> PatchCodec:
    """Fit on `num_clips` procedural clips of every combination (seed stream `seed`)."""
    config = config or ClipConfig()
    batch = 64
    clips = (make_batch(seed, b, min(batch, num_clips - b * batch), config, "all")["frames"]
             for b in range((num_clips + batch - 1) // batch))
    return fit_codec(clips, patch=patch, channels=channels)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 arrays of the same shape."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fit the procedural patch codec and report its PSNR.")
    parser.add_argument("--fit", required=True, help="output path, e.g. /tmp/codec (writes .safetensors + .json)")
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args(argv)
    codec = fit_default_codec(num_clips=args.clips, channels=args.channels)
    codec.save(args.fit)
    frames = make_batch(seed=4321, batch_index=0, batch_size=64, config=ClipConfig(), split="all")["frames"]
    print(f"wrote {args.fit}.safetensors / .json; PSNR on 64 fresh clips: "
          f"{psnr(frames.numpy(), codec.decode(codec.encode(frames))):.2f} dB")


if __name__ == "__main__":
    main()
