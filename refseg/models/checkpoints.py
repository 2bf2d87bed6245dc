"""Finding, downloading, verifying and reading model checkpoints.

A checkpoint is found in this order: an explicit local path (used as is), else
``<cache dir>/<filename>``, else it is downloaded from its official URL into the
cache (unless offline). The cache dir is the ``cache_dir`` option, else the
environment variable ``REFSEG_CACHE_DIR``, else ``~/.cache/refseg``. Offline mode
is the ``offline`` option, else ``REFSEG_OFFLINE=1``.

Integrity: where the official sha256 of a file is known it is checked on every
load. Where it is not (no published hashes are bundled; see
:attr:`CheckpointSpec.sha256`), the hash of the first copy seen is recorded in a
sidecar ``<file>.sha256`` (``sha256sum`` format) and every later load is checked
against it (trust on first use), so a file that changes or is cut short later on
is caught.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from refseg.io.files import atomic_file, sha256_file, write_atomic  # sha256_file: also imported from here
from refseg.errors import InvalidInput, RefsegError

import torch

CACHE_ENV = "REFSEG_CACHE_DIR"
OFFLINE_ENV = "REFSEG_OFFLINE"
_CHUNK = 1 << 20


class CheckpointError(RefsegError, RuntimeError):
    """A checkpoint exists but cannot be used (corrupt, wrong layout, wrong model, failed checksum)."""


@dataclass(frozen=True)
class CheckpointSpec:
    """Where one official checkpoint comes from.

    url:      official download address (``file://`` works too, used by the tests).
    filename: name of the file in the cache dir.
    sha256:   official hex digest if known; ``None`` means trust on first use.
    """

    url: str
    filename: str
    sha256: str | None = None


def get_cache_dir(option: str | os.PathLike | None = None) -> Path:
    """The checkpoint cache dir: ``option``, else ``$REFSEG_CACHE_DIR``, else ``~/.cache/refseg``."""
    if option is not None:
        return Path(option).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "refseg"


cache_dir = get_cache_dir  # short public name (resolve_checkpoint's parameter of that name shadows it there)


def is_offline(option: bool | None = None) -> bool:
    """Offline mode: ``option`` if given, else ``REFSEG_OFFLINE`` set to 1/true/yes/on."""
    if option is not None:
        return bool(option)
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def sidecar_path(path: str | os.PathLike) -> Path:
    """Path of the ``<file>.sha256`` sidecar recording a file's hash on first use."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def resolve_checkpoint(
    spec: CheckpointSpec | None,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> Path:
    """Return the local path of a checkpoint, downloading it into the cache if needed.

    ``path`` (a local file) wins and is used as is, without checksum. Otherwise
    ``spec`` names the file, looked up in the cache dir, downloaded from
    ``spec.url`` when absent and not offline, and verified (see module docstring).
    """
    if path is not None:
        local = Path(path).expanduser()
        if not local.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {local}")
        return local
    if spec is None:
        raise InvalidInput("no checkpoint: give a local checkpoint path or a model name with an official checkpoint")
    root = get_cache_dir(cache_dir)
    target = root / spec.filename
    if target.is_file():
        verify_checkpoint(target, spec.sha256)
        return target
    if is_offline(offline):
        raise FileNotFoundError(
            f"checkpoint {spec.filename!r} is not in the cache and offline mode is on.\n"
            f"  expected file: {target}\n"
            f"  cache dir:     {root} (set with cache_dir / --cache-dir or ${CACHE_ENV})\n"
            f"  download it by hand from {spec.url}\n"
            f"  e.g.: mkdir -p '{root}' && curl -L -o '{target}' '{spec.url}'\n"
            f"  or pass the path of a local copy as the checkpoint."
        )
    download(spec.url, target, spec.sha256)
    return target



def verify_checkpoint(path: Path, expected_sha256: str | None) -> str:
    """Check ``path`` against the official hash, else against (or into) its sidecar. Returns the hash."""
    actual = sha256_file(path)
    sidecar = sidecar_path(path)
    if expected_sha256 is not None:
        if actual != expected_sha256.lower():
            raise CheckpointError(
                f"checksum mismatch for {path}: sha256 {actual}, official {expected_sha256}. "
                f"The file is corrupt or not the official one: delete it and it will be downloaded again."
            )
        return actual
    if sidecar.is_file():
        fields = sidecar.read_text().split()
        recorded = fields[0].lower() if fields else ""
        if recorded != actual:
            raise CheckpointError(
                f"checksum mismatch for {path}: sha256 {actual}, but {recorded or '(empty)'} was recorded in "
                f"{sidecar} when the file was first used. The file changed or is damaged: delete it (and its "
                f".sha256 file) and it will be downloaded again."
            )
        return actual
    _write_sidecar(path, actual)
    return actual


def _write_sidecar(path: Path, digest: str) -> None:
    write_atomic(sidecar_path(path), f"{digest}  {path.name}\n")


def download(url: str, target: str | os.PathLike, expected_sha256: str | None = None) -> str:
    """Download ``url`` to ``target`` atomically (temp file, then rename), with a progress bar.

    Verifies ``expected_sha256`` if given, else records the hash in the sidecar.
    Returns the hex sha256.
    """
    from tqdm.auto import tqdm

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # the download goes to a fsync'd temporary file, renamed to ``target`` only when complete and verified
    with atomic_file(target, "wb", suffix=".part") as out:
        try:
            response = urllib.request.urlopen(url, timeout=60)
        except Exception as exc:  # URLError, HTTPError, OSError, ValueError for odd URLs
            raise CheckpointError(
                f"could not download {url}: {exc}. Check the network, or download the file by hand to "
                f"{target} and run offline (REFSEG_OFFLINE=1)."
            ) from exc
        with response:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=target.name, disable=None) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if total and out.tell() != int(total):
            raise CheckpointError(
                f"download of {url} ended early: got {out.tell()} of {total} bytes. Try again."
            )
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise CheckpointError(
                f"checksum mismatch for the download of {url}: sha256 {actual}, official {expected_sha256}. "
                f"Nothing was saved; try again."
            )
    if expected_sha256 is None:
        _write_sidecar(target, actual)
    return actual


# ---------------------------------------------------------------------------- reading state dicts


def load_torch_file(path: str | os.PathLike, what: str) -> object:
    """``torch.load(weights_only=True)`` on CPU with a clear error for unreadable files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, not a torch file...
        import pickle

        if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower():
            # the file is a readable checkpoint, but it holds Python objects (code) besides tensors
            raise CheckpointError(
                f"refused {what} checkpoint {path}: the file holds Python objects (classes or code), not only "
                f"tensors, and was refused for safety (loading it could run code from the file). Use a "
                f"checkpoint that holds a plain state dict of tensors (e.g. the official weights)."
            ) from None
        raise CheckpointError(
            f"cannot read {what} checkpoint {path}: {type(exc).__name__}: {exc}. The file is truncated, corrupt "
            f"or not a PyTorch checkpoint; if it was downloaded, delete it and download it again."
        ) from exc


def check_state_dict(state_dict: object, path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Ensure ``state_dict`` is a mapping of names to tensors."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{path} is not a {what} checkpoint: expected a state dict, got {type(state_dict).__name__}"
        )
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a {what} checkpoint: entries that are not named tensors: {_preview(map(str, bad))}"
        )
    return dict(state_dict)


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                           path: str | os.PathLike, what: str) -> None:
    """Load exactly: every key present, no extra key, every shape equal; errors name the file and the keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit {what}: " + "; ".join(problems)
            + ". Is it the checkpoint of this model variant?"
        )
    module.load_state_dict(state_dict, strict=True)


def _preview(items, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
