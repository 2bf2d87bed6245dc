"""On-disk cache of stage-1 outputs (:class:`~refseg.method.pipeline.Candidates`), so that
re-matching after a change of references or merge settings runs no network.

Stage 1 (:meth:`Segmenter.propose`: SAM2 proposals + DINOv2 features) depends only on
the image, the models and the proposal settings; stage 2 (:meth:`Segmenter.label`)
depends on the memory bank and the match/merge settings. With a cache::

    cache = CandidateCache("cache/coco-val")
    dets = seg.predict_batch(paths, cache=cache)      # misses: networks run, entries written
    seg.set_bank(new_bank)                            # or seg.config = ... (merge settings)
    dets = seg.predict_batch(paths, cache=cache)      # hits: no network, no image decode

Identity
    A cache directory holds entries made with ONE set of stage-1 settings, recorded in
    ``manifest.json`` (:func:`stage1_settings`: proposer class/name/config and a weights
    fingerprint, encoder settings, ``ProposalConfig``, precision, mask threshold). Using
    the directory with other settings raises :class:`CacheMismatchError` naming the
    differences: use another directory (e.g. one per :func:`settings_hash`) or
    :meth:`CandidateCache.clear` it. Each entry also records the settings hash and its
    image key, so an entry copied from elsewhere is never taken for a hit.

Image keys
    :func:`image_key`: for a path, a hash of the resolved path, file size and
    modification time (the file is not read, so a hit costs no image decode); for an
    array or PIL image, a hash of its pixels. Callers may give their own keys (any
    string, e.g. a dataset id); they are hashed into file names.

Entry format (``entries/<k[:2]>/<k>.npz``, numpy zip, read with ``allow_pickle=False``)
    ``meta``      JSON string: format version, key, settings hash, image size, codecs.
    ``pred_iou``  [N] float32.
    ``features``  [N, D] float32 (lossless, default) or float16 (``features="fp16"``).
    logits, by ``logits=`` codec:

    - ``"exact"`` (default): ``side`` = bit-packed ``logits > t`` (t = mask threshold)
      and ``near`` = bit-packed set of cells whose 3x3 neighbourhood straddles t (both
      zlib-compressed); ``values`` = float32 logits of the ``near`` cells only. Other
      cells are decoded as t + 1 or t - 1. Bilinear interpolation at any output size
      reads 2x2 blocks of adjacent cells: a block with cells on both sides of t consists
      of ``near`` cells only (exact values), any other block lies on one side, which the
      fill keeps. So every thresholded mask the method uses (low-resolution masks for
      pooling/NMS, full-resolution and merge-resolution masks) is bit-identical to the
      uncached one. With t != 0, cells within 1e-4 of t are stored exactly too (rounding).
      Decoded logits are NOT the original values away from the zero crossing.
    - ``"fp16"``: all logits as float16 (sign-preserving: a positive value never rounds
      to the threshold). Masks near-identical.
    - ``"int8"``: all logits clamped to +-64 and quantised to int8 on an asinh scale
      (fine near t, ~6 % relative steps far from it; a linear step of 0.25 moved zero
      crossings too much), sign-preserving at t. Low-resolution masks exact,
      full-resolution ones approximate (measured per-detection mask IoU >= 0.99).

    ``compress=True`` deflates the whole archive (smaller, slower to read and write).

    Sizes (``benchmarks/rematch.py --sizes``): 300 smooth SAM-like proposals at 256x256
    with 1024-d features take 1.9 MB with the defaults (1.3 MB with fp16 features; raw
    float32 80 MB, fp16 logits 41 MB). The exact codec costs two bitmaps (1 bit per cell
    each before zlib, far less for blob-like masks) plus 4 bytes per cell near a zero
    crossing, so noise-like logits (random weights) are its worst case: about 4 bytes per
    cell, more than fp16 or int8.

Writes go to a temporary file in the same directory, then ``os.replace``: an
interrupted run leaves either the old entry, the new one, or a stray ``.tmp-*`` file
that lookups ignore. A file that cannot be read or fails validation (zip CRC, shapes,
key, settings) counts as corrupt: it is a miss, recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from refseg.errors import RefsegError
from refseg.io.files import mkstemp as _mkstemp
from refseg.method.identity import identity_key, jsonable
from refseg.method.pipeline import STAGE1_VERSION, Candidates

if TYPE_CHECKING:  # pragma: no cover
    from refseg.runtime.labelling import Labeller

log = logging.getLogger(__name__)

FORMAT = "refseg-candidate-cache"
FORMAT_VERSION = 1
__all__ = ["STAGE1_VERSION", "CacheError", "CacheMismatchError", "CandidateCache", "image_key", "settings_hash",
           "stage1_settings"]
LOGIT_CODECS = ("exact", "fp16", "int8")
FEATURE_CODECS = ("fp32", "fp16")
INT8_RANGE = 64.0  # int8 codec: logits clamped to +-INT8_RANGE ...
INT8_KNEE = 0.05  # ... and quantised on an asinh scale: steps of ~0.003 near 0, ~6 % of the value beyond
_NEAR_EPS = 1e-4  # exact codec: cells this close to the threshold are stored exactly


class CacheError(RefsegError, RuntimeError):
    """A candidate cache cannot be used."""


class CacheMismatchError(CacheError, ValueError):
    """A cache directory was made with different stage-1 settings (models, proposal settings...)."""


# ---------------------------------------------------------------------------- identity
def stage1_settings(segmenter) -> dict:
    """Everything that determines a segmenter's :class:`Candidates` for a given image
    (its :meth:`~refseg.method.pipeline.Segmenter.stage1_settings`; a DevicePool has the same method)."""
    return jsonable(segmenter.stage1_settings())


def settings_hash(settings: dict) -> str:
    """Short stable hash of a settings dict (e.g. to name one cache directory per settings)."""
    return identity_key(settings)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path or '<root>'}: cache={a!r} now={b!r}"]


def image_key(source: Any) -> str:
    """Cache key of an image: path -> hash of (resolved path, size, mtime); array/PIL -> hash of the pixels."""
    from PIL import Image

    digest = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).resolve()
        try:
            st = path.stat()
        except OSError as exc:
            from refseg.io.images import ImageLoadError
            raise ImageLoadError(f"image not found: {source}") from exc
        digest.update(f"file:{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        if isinstance(source, Image.Image):
            from refseg.io.images import load_image
            source = load_image(source)
        arr = np.ascontiguousarray(np.asarray(source))
        digest.update(f"array:{arr.shape}|{arr.dtype}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------- codecs
def _pack(bits: np.ndarray) -> np.ndarray:
    return np.frombuffer(zlib.compress(np.packbits(bits.reshape(-1)).tobytes(), 6), dtype=np.uint8)


def _unpack(blob: np.ndarray, count: int) -> np.ndarray:
    raw = np.frombuffer(zlib.decompress(blob.tobytes()), dtype=np.uint8)
    if raw.size * 8 < count:
        raise CacheError("bitmap too short")
    return np.unpackbits(raw, count=count).view(bool)


def _dilate3x3(m: torch.Tensor) -> torch.Tensor:
    """[N, h, w] bool: OR over each cell's 3x3 neighbourhood (clipped at the borders), by shifts."""
    rows = m.clone()
    rows[:, 1:] |= m[:, :-1]
    rows[:, :-1] |= m[:, 1:]
    out = rows.clone()
    out[:, :, 1:] |= rows[:, :, :-1]
    out[:, :, :-1] |= rows[:, :, 1:]
    return out


def _near_threshold(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(side = logits > t, near = cells with both sides in their 3x3 neighbourhood, or within eps of t != 0)."""
    side = logits > threshold
    near = _dilate3x3(side) & _dilate3x3(~side)
    if threshold != 0.0:  # at t = 0 a convex combination of same-side values cannot round across t
        eps = _NEAR_EPS * max(1.0, abs(threshold))
        near |= (logits > threshold - eps) & (logits <= threshold + eps)
    return side, near


def encode_logits(logits: torch.Tensor, threshold: float, codec: str) -> dict[str, np.ndarray]:
    """[N, h, w] float logits -> arrays to store (see the module docstring)."""
    logits = logits.detach().float()
    if codec == "exact":  # the neighbourhood test runs where the logits are (the GPU after a miss)
        side, near = _near_threshold(logits, threshold)
        return {"side": _pack(side.cpu().numpy()), "near": _pack(near.cpu().numpy()),
                "values": logits[near].cpu().numpy()}
    v = logits.cpu().numpy()
    above = v > threshold
    if codec == "fp16":
        d = np.clip(v - threshold, -65504, 65504).astype(np.float16)
        tiny = np.float16(np.finfo(np.float16).smallest_subnormal)
        d[above & (d <= 0)] = tiny  # keep the side of every cell
        return {"logits_fp16": d}
    if codec == "int8":
        scale = np.float32(127.0 / np.arcsinh(INT8_RANGE / INT8_KNEE))
        q = np.clip(np.rint(np.arcsinh((v - threshold) / INT8_KNEE) * scale), -127, 127).astype(np.int8)
        q[above & (q <= 0)] = 1
        return {"logits_int8": q}
    raise ValueError(f"unknown logits codec {codec!r}; choose one of {', '.join(LOGIT_CODECS)}")


def decode_logits(arrays: Any, codec: str, shape: tuple[int, int, int], threshold: float) -> torch.Tensor:
    """Inverse of :func:`encode_logits`: float32 [N, h, w]."""
    n = int(np.prod(shape))
    if codec == "exact":
        side = _unpack(arrays["side"], n)
        near = _unpack(arrays["near"], n)
        values = np.asarray(arrays["values"], dtype=np.float32)
        if values.shape != (int(near.sum()),):
            raise CacheError("exact codec: value count does not match its bitmap")
        out = side.astype(np.float32)  # fill: t + 1 above the threshold, t - 1 below (faster than np.where)
        out *= 2.0
        out += np.float32(threshold - 1.0)
        out[near] = values
        return torch.from_numpy(out.reshape(shape))
    if codec == "fp16":
        d = np.asarray(arrays["logits_fp16"])
        out = d.astype(np.float32) + np.float32(threshold)
    elif codec == "int8":
        q = np.asarray(arrays["logits_int8"])
        scale = np.float32(np.arcsinh(INT8_RANGE / INT8_KNEE) / 127.0)
        out = np.sinh(q.astype(np.float32) * scale) * np.float32(INT8_KNEE) + np.float32(threshold)
    else:
        raise CacheError(f"unknown logits codec {codec!r}")
    if out.shape != tuple(shape):
        raise CacheError(f"logits have shape {out.shape}, expected {tuple(shape)}")
    return torch.from_numpy(np.ascontiguousarray(out))


# ---------------------------------------------------------------------------- the cache
class CandidateCache:
    """Per-image :class:`Candidates` on disk, for one set of stage-1 settings.

    ``root``: the cache directory (created on first write). ``settings``: stage-1
    settings to bind now (else bound on first use with a segmenter, see :meth:`bind`).
    ``logits`` / ``features`` / ``compress``: how new entries are written (entries of any
    codec are read). ``stats`` counts hits, misses, corrupt entries and writes.
    """

    def __init__(self, root: str | os.PathLike, settings: dict | None = None, *, logits: str = "exact",
                 features: str = "fp32", compress: bool = False):
        if logits not in LOGIT_CODECS:
            raise ValueError(f"unknown logits codec {logits!r}; choose one of {', '.join(LOGIT_CODECS)}")
        if features not in FEATURE_CODECS:
            raise ValueError(f"unknown features codec {features!r}; choose one of {', '.join(FEATURE_CODECS)}")
        self.root = Path(root)
        self.logits_codec, self.features_codec, self.compress = logits, features, bool(compress)
        self.settings: dict | None = None
        self.settings_hash: str | None = None
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "writes": 0}
        self._bound_source: dict | None = None  # the settings object last bound (a segmenter's memoised dict)
        if settings is not None:
            self.bind(settings)
        elif (self.root / "manifest.json").exists():
            try:
                stored = self._read_manifest()["settings"]
            except (KeyError, TypeError, AttributeError) as exc:
                raise CacheError(f"candidate cache manifest {self.manifest_path} is corrupt ({exc!r}); "
                                 f"delete the folder {self.root} (it is rebuilt)") from None
            self.bind(stored)

    # ------------------------------------------------------------------ settings
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def _read_manifest(self) -> dict:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"cannot read candidate cache manifest {self.manifest_path}: {exc}; "
                             f"delete the folder {self.root} (it is rebuilt)") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise CacheError(f"{self.manifest_path} is not a refseg candidate cache of version {FORMAT_VERSION} "
                             f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
        return manifest

    def bind(self, settings: dict) -> None:
        """Tie the cache to stage-1 ``settings``; write the manifest, or check it matches.

        Raises :class:`CacheMismatchError` when the directory (or this object) already
        holds other settings.
        """
        if settings is self._bound_source:  # the same segmenter settings as last time: nothing to compare
            return
        source, settings = settings, jsonable(settings)
        if self.settings is not None:
            if settings != self.settings:
                raise self._mismatch(self.settings, settings)
            self._bound_source = source
            return
        rebuild = False
        if self.manifest_path.exists():
            try:
                stored = self._read_manifest()["settings"]
            except (CacheError, KeyError, TypeError, AttributeError) as exc:
                if self.root.name != settings_hash(settings):
                    raise CacheError(f"candidate cache manifest {self.manifest_path} is unreadable or corrupt "
                                     f"({exc}); delete the folder {self.root} (it is rebuilt)") from None
                # the folder is named by the hash of these very settings: the manifest can be rewritten safely
                log.warning("candidate cache manifest %s was unreadable or corrupt; rewritten from the "
                               "current settings (the folder is named by their hash)", self.manifest_path)
                rebuild = True
            else:
                if stored != settings:
                    raise self._mismatch(stored, settings)
        if rebuild or not self.manifest_path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "settings_hash": settings_hash(settings),
                        "settings": settings}
            self._atomic_write(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self.settings, self.settings_hash = settings, settings_hash(settings)
        self._bound_source = source

    @classmethod
    def for_segmenter(cls, base: str | os.PathLike, segmenter: "Labeller", **codecs) -> "CandidateCache":
        """The cache of ``segmenter``'s stage-1 settings (its ``stage1_settings()``: a Segmenter or a DevicePool)
        under ``base``: one sub-folder per :func:`settings_hash`, so other models or proposal settings get their
        own entries. ``codecs``: as for the constructor."""
        source = segmenter.stage1_settings()
        settings = jsonable(source)
        cache = cls(Path(base) / settings_hash(settings), settings, **codecs)
        cache._bound_source = source
        return cache

    def _mismatch(self, stored: dict, now: dict) -> CacheMismatchError:
        diffs = _diff(stored, now)
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
        return CacheMismatchError(
            f"candidate cache {self.root} was made with other stage-1 settings ({shown}); its entries would be "
            "wrong for these models/settings. Use another cache directory (e.g. one per settings_hash) or clear() it")

    def _require_bound(self) -> None:
        if self.settings is None:
            raise CacheError(f"candidate cache {self.root} is not bound to any settings yet: call bind() or use it "
                             "through Segmenter.predict_batch(..., cache=...)")

    # ------------------------------------------------------------------ entries
    def path_for(self, key: str) -> Path:
        h = hashlib.sha256(str(key).encode()).hexdigest()[:40]
        return self.root / "entries" / h[:2] / f"{h}.npz"

    def __contains__(self, key: str) -> bool:
        return self.path_for(key).exists()

    def __len__(self) -> int:
        return sum(1 for _ in (self.root / "entries").glob("*/[!.]*.npz"))

    def put(self, key: str, cand: "Candidates") -> Path:
        """Store one image's candidates under ``key`` (atomic replace)."""
        self._require_bound()
        t = float(self.settings["mask_threshold"])
        n = len(cand)
        shape = tuple(int(s) for s in cand.logits.shape)
        arrays = encode_logits(cand.logits, t, self.logits_codec) if n else {}
        feats = cand.features.detach().to("cpu", torch.float32).numpy()
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "key": str(key), "settings_hash": self.settings_hash,
                "image_size": [int(s) for s in cand.image_size], "logits_shape": list(shape),
                "feature_dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
                "logits_codec": self.logits_codec, "features_codec": self.features_codec}
        arrays["meta"] = np.array(json.dumps(meta))
        arrays["pred_iou"] = cand.pred_iou.detach().to("cpu", torch.float32).numpy()
        arrays["features"] = feats.astype(np.float16 if self.features_codec == "fp16" else np.float32)
        buf = io.BytesIO()
        (np.savez_compressed if self.compress else np.savez)(buf, **arrays)
        path = self.path_for(key)
        self._atomic_write(path, buf.getvalue())
        self.stats["writes"] += 1
        return path

    def get(self, key: str, device: torch.device | str | None = None) -> "Candidates | None":
        """The stored candidates of ``key`` (on ``device``), or None when missing or corrupt (see ``stats``)."""
        self._require_bound()
        path = self.path_for(key)
        if not path.exists():
            self.stats["misses"] += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
                if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
                    raise CacheError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
                if meta.get("key") != str(key) or meta.get("settings_hash") != self.settings_hash:
                    raise CacheError("entry belongs to another key or other settings")
                shape = tuple(int(s) for s in meta["logits_shape"])
                n = shape[0]
                pred_iou = torch.from_numpy(np.asarray(z["pred_iou"], dtype=np.float32))
                features = torch.from_numpy(np.asarray(z["features"]).astype(np.float32))
                if pred_iou.shape != (n,) or features.shape != (n, meta["feature_dim"]):
                    raise CacheError("array shapes do not agree")
                t = float(self.settings["mask_threshold"])
                logits = decode_logits(z, meta["logits_codec"], shape, t) if n else torch.zeros(shape)
            if not (torch.isfinite(features).all() and torch.isfinite(pred_iou).all()):
                raise CacheError("non-finite values")
        except Exception as exc:  # zip/CRC/zlib/JSON/shape errors alike: a corrupt entry
            log.warning("candidate cache: corrupt entry %s (%s); it will be recomputed", path, exc)
            self.stats["corrupt"] += 1
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        cand = Candidates(logits, pred_iou, features, (int(meta["image_size"][0]), int(meta["image_size"][1])))
        return cand.to(device) if device is not None else cand

    def clear(self) -> None:
        """Delete every entry and the manifest (the object becomes unbound)."""
        shutil.rmtree(self.root / "entries", ignore_errors=True)
        self.manifest_path.unlink(missing_ok=True)
        self.settings = self.settings_hash = self._bound_source = None

    def size_bytes(self) -> int:
        """Bytes on disk of all entries."""
        return sum(p.stat().st_size for p in (self.root / "entries").glob("*/[!.]*.npz"))

    # ------------------------------------------------------------------ with a segmenter
    @staticmethod
    def key_of(source: Any) -> str:
        """The default key of an image (:func:`image_key`)."""
        return image_key(source)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
