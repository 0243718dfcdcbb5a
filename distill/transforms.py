"""Preprocessing between uint8 images and the float space models consume: normalization and ZCA.

`Preprocessor.fit` takes per-channel mean/std from the training images and, optionally, a ZCA
whitening transform fitted on the normalized training images, computed as kornia's
`ZCAWhitening(eps=0.1)` does (the variant MTT and its successors distill in): subtract the
per-feature mean, then multiply by U diag(1/sqrt(S + eps)) U^T from the eigendecomposition of
the covariance. Distilled pixels live in this space, so the transform is saved with them (one
`.safetensors` file, config in its metadata) and `to_uint8` maps them back for previews.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import safetensors
import safetensors.torch
import torch

from distill.data import DataError

# A D x D ZCA matrix for D = C*H*W: 3x64x64 (D=12288) is 0.6 GiB in float32 plus a float64
# covariance and eigenvectors while fitting (~3.4 GiB); beyond this the cost grows as D^2 / D^3.
MAX_ZCA_DIM = 16384
PREPROCESSOR_FORMAT = "distillery.preprocessor/1"


@dataclass(eq=False)
class Preprocessor:
    """uint8 [N, C, H, W] -> float32: x/255, per-channel (x - mean) / std, then optional ZCA.

    mean/std are in [0, 1] pixel units, as in torchvision's Normalize after ToTensor.
    zca_mean is the per-feature mean of the normalized training images that ZCA subtracts
    first (kornia does the same); image_shape is [C, H, W] of the fitted images (None for
    `standard`, which works at any size).
    """

    mean: torch.Tensor
    std: torch.Tensor
    zca: torch.Tensor | None = None
    zca_inv: torch.Tensor | None = None
    zca_mean: torch.Tensor | None = None
    zca_eps: float | None = None
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(self.std, dtype=torch.float32).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise DataError(f"mean has {self.mean.numel()} channels but std has {self.std.numel()}")
        if bool((self.std <= 0).any()):
            raise DataError(f"std must be positive per channel; got {self.std.tolist()}")
        parts = (self.zca, self.zca_inv, self.zca_mean)
        if any(p is None for p in parts) != all(p is None for p in parts):
            raise DataError("zca, zca_inv and zca_mean must be given together")
        if self.zca is not None and self.image_shape is None:
            raise DataError("a ZCA preprocessor needs image_shape [C, H, W]")
        if self.image_shape is not None:
            self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]

    @classmethod
    def fit(
        cls,
        train_images_uint8: torch.Tensor,
        *,
        zca: bool | str = False,
        zca_eps: float = 0.1,
        batch_size: int = 4096,
    ) -> Preprocessor:
        """Per-channel mean/std of the training images, and with zca a ZCA transform.

        zca=True whitens the standardized images; zca="pixels" whitens [0, 1] pixels with no
        per-channel standardization, as MTT's kornia ZCAWhitening does ("Dataset Distillation by
        Matching Training Trajectories", section 5). The same eps is relatively about 16 times
        stronger on [0, 1] pixels, whose variance is that much smaller than standardized pixels'.
        """
        if zca not in (False, True, "pixels"):
            raise DataError(f"zca must be false, true or 'pixels'; got {zca!r}")
        x = _check_uint8(train_images_uint8)
        n, c, h, w = x.shape
        if n < 2:
            raise DataError(f"fitting a preprocessor needs at least 2 training images; got {n}")
        # float64 sums: 100k x 32 x 32 pixel sums overflow float32's precision.
        total = torch.zeros(c, dtype=torch.float64)
        total_sq = torch.zeros(c, dtype=torch.float64)
        for s in range(0, n, batch_size):
            b = x[s : s + batch_size].to(torch.float64).div_(255.0)
            total += b.sum(dim=(0, 2, 3))
            total_sq += b.square().sum(dim=(0, 2, 3))
        count = n * h * w
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
        # A relative tolerance, not `== 0`: constant images leave a round-off std of ~1e-8, and
        # dividing by it turns noise into huge inputs that train at chance. 1e-4 is a 40th of
        # one 8-bit level, far below any real image's spread (~0.25).
        if bool((std < 1e-4).any()):
            raise DataError(
                f"a channel is constant (or nearly) over the training images (std {std.tolist()} in [0, 1] "
                "units); cannot normalize: check that the images decoded correctly"
            )
        pre = cls(mean.float(), std.float(), image_shape=(c, h, w))
        if not zca:
            return pre
        if zca == "pixels":
            pre = cls(torch.zeros(c), torch.ones(c), image_shape=(c, h, w))
        d = c * h * w
        if d > MAX_ZCA_DIM:
            raise DataError(
                f"ZCA on {c}x{h}x{w} images needs a {d}x{d} matrix (D = C*H*W = {d}; "
                f"{d * d * 8 / 2**30:.1f} GiB of memory per float64 copy while fitting, and a cubic-time "
                "eigendecomposition); "
                f"ZCA is limited to D <= {MAX_ZCA_DIM}: resize the images (e.g. image_size=32) "
                "or use zca=False"
            )
        if zca_eps <= 0:
            raise DataError(f"zca_eps must be > 0; got {zca_eps}")
        feat_sum = torch.zeros(d, dtype=torch.float64)
        gram = torch.zeros(d, d, dtype=torch.float64)
        for s in range(0, n, batch_size):
            b = pre._normalize(x[s : s + batch_size]).reshape(-1, d).to(torch.float64)
            feat_sum += b.sum(0)
            gram.addmm_(b.T, b)
        feat_mean = feat_sum / n
        # Unbiased covariance, as kornia's zca_mean(unbiased=True).
        cov = (gram - n * torch.outer(feat_mean, feat_mean)) / (n - 1)
        del gram
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp_min(0)  # round-off can make the null space slightly negative
        whiten = (eigvecs * (eigvals + zca_eps).rsqrt()) @ eigvecs.T
        unwhiten = (eigvecs * (eigvals + zca_eps).sqrt()) @ eigvecs.T
        return cls(
            pre.mean,
            pre.std,
            zca=whiten.float(),
            zca_inv=unwhiten.float(),
            zca_mean=feat_mean.float(),
            zca_eps=float(zca_eps),
            image_shape=(c, h, w),
        )

    @classmethod
    def standard(cls, mean: Any, std: Any) -> Preprocessor:
        """Fixed per-channel statistics in [0, 1] units, e.g. ImageNet's (0.485, 0.456, 0.406)."""
        return cls(torch.as_tensor(mean), torch.as_tensor(std))

    @property
    def kind(self) -> str:
        return "zca" if self.zca is not None else "normalize"

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(images.device).view(1, -1, 1, 1)
        std = self.std.to(images.device).view(1, -1, 1, 1)
        return images.float().div_(255.0).sub_(mean).div_(std)

    def _check_shape(self, shape: torch.Size) -> None:
        if shape[1] != self.mean.numel():
            raise DataError(f"images have {shape[1]} channels; this preprocessor expects {self.mean.numel()}")
        if self.zca is not None and tuple(shape[1:]) != self.image_shape:
            raise DataError(
                f"images are {list(shape[1:])}; this ZCA preprocessor was fitted on {list(self.image_shape or ())}"
            )

    def __call__(self, images_uint8: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """uint8 [N, C, H, W] -> float32 [N, C, H, W] on the images' device, batched to bound memory."""
        x = _check_uint8(images_uint8)
        self._check_shape(x.shape)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], batch_size):
            b = self._normalize(x[s : s + batch_size])
            if self.zca is not None:
                assert self.zca_mean is not None
                flat = b.reshape(b.shape[0], -1) - self.zca_mean.to(b.device)
                b = (flat @ self.zca.to(b.device)).view_as(b)
            out[s : s + batch_size] = b
        return out

    def to_uint8(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Inverse for previews: undo ZCA, un-normalize, round and clamp to uint8."""
        if x.ndim != 4:
            raise DataError(f"expected float images [N, C, H, W]; got shape {list(x.shape)}")
        self._check_shape(x.shape)
        out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        for s in range(0, x.shape[0], batch_size):
            b = x[s : s + batch_size].detach().float()
            if self.zca_inv is not None:
                assert self.zca_mean is not None
                flat = b.reshape(b.shape[0], -1) @ self.zca_inv.to(b.device) + self.zca_mean.to(b.device)
                b = flat.view_as(b)
            out[s : s + batch_size] = (b * std + mean).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return out

    def config(self) -> dict[str, Any]:
        """JSON-serializable description; with state_dict() it rebuilds the preprocessor exactly."""
        return {
            "kind": self.kind,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "zca_eps": self.zca_eps,
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"mean": self.mean, "std": self.std}
        if self.zca is not None:
            assert self.zca_inv is not None and self.zca_mean is not None
            tensors |= {"zca": self.zca, "zca_inv": self.zca_inv, "zca_mean": self.zca_mean}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Preprocessor:
        kind = config.get("kind")
        if kind not in ("normalize", "zca"):
            raise DataError(f"unknown preprocessor kind {kind!r}; valid kinds: normalize, zca")
        needed = ["mean", "std"] + (["zca", "zca_inv", "zca_mean"] if kind == "zca" else [])
        missing = [k for k in needed if k not in tensors]
        if missing:
            raise DataError(f"preprocessor state lacks tensors {missing}; it has {sorted(tensors)}")
        shape = config.get("image_shape")
        return cls(
            tensors["mean"],
            tensors["std"],
            zca=tensors.get("zca") if kind == "zca" else None,
            zca_inv=tensors.get("zca_inv") if kind == "zca" else None,
            zca_mean=tensors.get("zca_mean") if kind == "zca" else None,
            zca_eps=config.get("zca_eps"),
            image_shape=tuple(shape) if shape is not None else None,  # type: ignore[arg-type]
        )

    def to_bytes(self) -> bytes:
        """One .safetensors blob: the tensors, with config() as JSON in its metadata."""
        return safetensors_bytes(self.config(), self.state_dict())

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "preprocessor") -> Preprocessor:
        try:
            tensors = safetensors.torch.load(raw)
            meta = _safetensors_metadata(raw)
        except (ValueError, safetensors.SafetensorError) as e:
            raise DataError(f"{where}: not a readable safetensors file ({e})") from e
        if meta.get("format") != PREPROCESSOR_FORMAT:
            raise DataError(
                f"{where} is not a saved preprocessor (format {meta.get('format')!r}, expected {PREPROCESSOR_FORMAT!r})"
            )
        return cls.from_state(json.loads(meta["config"]), tensors)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Preprocessor:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), where=str(path))

    def fingerprint(self) -> str:
        """Short sha256 of config and tensors."""
        h = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.numpy().data)
        return h.hexdigest()[:16]


def _check_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"expected uint8 images [N, C, H, W]; got {images.dtype} {list(images.shape)}")
    return images


def safetensors_bytes(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """Preprocessor tensors as safetensors, self-describing: the config rides in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(tensors, metadata={"format": PREPROCESSOR_FORMAT, "config": json.dumps(config)})


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    # The header is an 8-byte little-endian length followed by JSON (safetensors spec).
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
