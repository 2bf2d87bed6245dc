"""The memory bank: per-reference instance embeddings, class names and class prototypes.

Only embeddings ([n_refs, D], a few KB each) are kept, so references and classes
can be added or removed without re-encoding anything. Negative references
(rejected predictions) are kept per class beside the positives.

On disk: one safetensors file whose JSON header (safetensors metadata, key
``refseg``) holds the format version, class names, encoder settings and each
reference's provenance, and the SHA-256 of the embedding tensor's bytes
(``embeddings_sha256``). Loading never unpickles anything; it checks the checksum
(banks written before it existed have none and load without that check) and that
every embedding is finite, and refuses a damaged bank naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from refseg.errors import RefsegError

FORMAT_VERSION = 1
_HEADER_KEY = "refseg"
_CHECKSUM_KEY = "embeddings_sha256"  # in the JSON header; absent from banks written before it existed


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes as safetensors stores them (row-major, little-endian)."""
    t = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(t.numpy().tobytes() if t.numel() else b"").hexdigest()


class BankError(RefsegError, ValueError):
    """A memory bank is unusable (empty, corrupt, or built for other features)."""


class BankMismatchError(BankError):
    """A bank was built with a different encoder or encoder settings."""


@dataclass
class ReferenceEntry:
    """Provenance of one stored embedding."""

    id: str
    class_name: str
    negative: bool = False
    source: dict = field(default_factory=dict)  # e.g. {"image": path, "annotation_id": 12}

    def to_dict(self) -> dict:
        return {"id": self.id, "class": self.class_name, "negative": self.negative, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "ReferenceEntry":
        return cls(id=str(d["id"]), class_name=str(d["class"]), negative=bool(d.get("negative", False)), source=d.get("source", {}))


class MemoryBank:
    """Reference embeddings per class; prototypes are derived on demand."""

    def __init__(self, encoder_settings: dict, class_names: list[str] | None = None):
        self.encoder_settings = dict(encoder_settings)
        self.class_names: list[str] = list(class_names or [])
        self.entries: list[ReferenceEntry] = []
        self._embeddings: list[torch.Tensor] = []  # each [D] float32 on CPU
        # per-class score thresholds (refseg.method.thresholds.ThresholdReport.to_dict()), with the checksum of
        # the embeddings they were estimated for under "embeddings_sha256"; {} when none were estimated
        self.thresholds: dict = {}
        # the prompt-selection threshold (refseg.method.prompt_selection.PromptThreshold.to_dict()), with the
        # same checksum; {} when none was chosen
        self.prompt_similarity: dict = {}

    # ------------------------------------------------------------------ editing
    def add(self, class_name: str, embedding: torch.Tensor, *, negative: bool = False, source: dict | None = None,
            id: str | None = None) -> str:
        """Add one reference embedding ``[D]`` of ``class_name``; returns its id."""
        emb = embedding.detach().to("cpu", torch.float32).reshape(-1)
        if self._embeddings and emb.shape[0] != self.dim:
            raise BankError(f"embedding has dimension {emb.shape[0]}, the bank holds {self.dim}")
        if not torch.isfinite(emb).all():
            raise BankError(f"embedding for class {class_name!r} is not finite")
        if class_name not in self.class_names:
            self.class_names.append(class_name)
        ref_id = id or uuid.uuid4().hex[:12]
        if any(e.id == ref_id for e in self.entries):
            raise BankError(f"a reference with id {ref_id!r} is already in the bank")
        self.entries.append(ReferenceEntry(ref_id, class_name, negative, dict(source or {})))
        self._embeddings.append(emb)
        return ref_id

    def remove(self, ids: str | list[str]) -> int:
        """Remove references by id; returns how many were removed."""
        ids = {ids} if isinstance(ids, str) else set(ids)
        keep = [i for i, e in enumerate(self.entries) if e.id not in ids]
        removed = len(self.entries) - len(keep)
        self.entries = [self.entries[i] for i in keep]
        self._embeddings = [self._embeddings[i] for i in keep]
        return removed

    def without(self, ids) -> "MemoryBank":
        """A copy of the bank without the references ``ids`` (the classes stay, even if left empty)."""
        ids = set(ids)
        copy = MemoryBank(self.encoder_settings, self.class_names)
        for entry, emb in zip(self.entries, self._embeddings):
            if entry.id not in ids:
                copy.entries.append(entry)
                copy._embeddings.append(emb)
        return copy

    def embeddings_sha256(self) -> str:
        """Checksum of the stored embeddings, in order (what the bank file's header records)."""
        return _tensor_sha256(self._stacked())

    def _stacked(self) -> torch.Tensor:
        return (torch.stack(self._embeddings) if self._embeddings else torch.zeros(0, self.dim)).contiguous()

    def remove_class(self, class_name: str) -> None:
        """Drop a class and all its references (positive and negative)."""
        if class_name not in self.class_names:
            raise BankError(f"class {class_name!r} is not in the bank (classes: {', '.join(self.class_names)})")
        self.remove([e.id for e in self.entries if e.class_name == class_name])
        self.class_names.remove(class_name)

    def find(self, *, class_name: str | None = None, negative: bool | None = None, **source) -> list[ReferenceEntry]:
        """Entries matching a class, polarity and source fields."""
        out = []
        for e in self.entries:
            if class_name is not None and e.class_name != class_name:
                continue
            if negative is not None and e.negative != negative:
                continue
            if any(e.source.get(k) != v for k, v in source.items()):
                continue
            out.append(e)
        return out

    # ------------------------------------------------------------------ views
    @property
    def dim(self) -> int:
        return int(self._embeddings[0].shape[0]) if self._embeddings else int(self.encoder_settings.get("dim", 0))

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self, negative: bool = False) -> dict[str, int]:
        """Number of references per class."""
        out = {c: 0 for c in self.class_names}
        for e in self.entries:
            if e.negative == negative:
                out[e.class_name] += 1
        return out

    def _stack(self, negative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [i for i, e in enumerate(self.entries) if e.negative == negative]
        if not rows:
            return torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.long)
        emb = torch.stack([self._embeddings[i] for i in rows])
        labels = torch.tensor([self.class_names.index(self.entries[i].class_name) for i in rows])
        return emb, labels

    def embeddings(self, negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [R, D], class indices [R]) of the positive (or negative) references."""
        return self._stack(negative)

    def prototypes(self) -> torch.Tensor:
        """[C, D] L2-normalised mean of each class's positive embeddings; zero rows for classes without any."""
        emb, labels = self._stack(False)
        c = len(self.class_names)
        sums = torch.zeros(c, self.dim)
        sums.index_add_(0, labels, emb)
        n = torch.bincount(labels, minlength=c).clamp(min=1).unsqueeze(1).float()
        return F.normalize(sums / n, dim=1)

    def check_usable(self) -> None:
        """Raise :class:`BankError` unless at least one class has a positive reference."""
        if not any(self.counts().values()):
            raise BankError("the memory bank holds no positive reference: add references before predicting")

    def check_encoder(self, encoder_settings: dict) -> None:
        """Raise :class:`BankMismatchError` if ``encoder_settings`` differ from the bank's."""
        mine, theirs = self.encoder_settings, dict(encoder_settings)
        diffs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: bank={mine.get(k)!r} encoder={theirs.get(k)!r}" for k in diffs)
            raise BankMismatchError(
                f"memory bank was built with different features ({detail}); rebuild the bank with this encoder "
                "or use the encoder it was built with"
            )

    # ------------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank to ``path`` (safetensors); atomic replace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        emb = self._stacked()
        header = {
            "format_version": FORMAT_VERSION,
            "class_names": self.class_names,
            "encoder": self.encoder_settings,
            "references": [e.to_dict() for e in self.entries],
            _CHECKSUM_KEY: _tensor_sha256(emb),
        }
        if self.thresholds:
            header["thresholds"] = self.thresholds
        if self.prompt_similarity:
            header["prompt_similarity"] = self.prompt_similarity
        from refseg.io.files import write_atomic

        # serialised in memory, then one fsync'd atomic write (mode following the umask)
        write_atomic(path, safetensors_bytes({"embeddings": emb}, metadata={_HEADER_KEY: json.dumps(header)}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder_settings: dict | None = None) -> "MemoryBank":
        """Read a bank; with ``encoder_settings``, refuse one built for other features.

        A bank whose embeddings do not match the checksum in its header, or hold a
        non-finite value, raises :class:`BankError` ("... is damaged ...; rebuild it").
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"memory bank not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings")
        except Exception as exc:  # safetensors raises its own error types
            raise BankError(f"cannot read memory bank {path}: {exc}") from exc
        if _HEADER_KEY not in meta:
            raise BankError(f"{path} is a safetensors file but not a refseg memory bank (no '{_HEADER_KEY}' header)")
        damaged = f"memory bank {path} is damaged"
        try:
            header = json.loads(meta[_HEADER_KEY])
        except ValueError as exc:
            raise BankError(f"{damaged}: its header is not valid JSON ({exc}); rebuild it") from None
        if not isinstance(header, dict):
            raise BankError(f"{damaged}: its header is not a JSON object; rebuild it")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise BankError(f"{path}: bank format version {version} is not supported (expected {FORMAT_VERSION})")
        expected = header.get(_CHECKSUM_KEY)
        if expected is not None and _tensor_sha256(emb) != expected:
            raise BankError(f"{damaged}: checksum mismatch (the embeddings are not the bytes that were saved); "
                            f"rebuild it")
        try:
            bank = cls(header["encoder"], header["class_names"])
            bank.entries = [ReferenceEntry.from_dict(d) for d in header["references"]]
            bank.thresholds = dict(header.get("thresholds") or {})
            bank.prompt_similarity = dict(header.get("prompt_similarity") or {})
        except (KeyError, TypeError, AttributeError) as exc:
            raise BankError(f"{damaged}: its header lacks or garbles {exc}; rebuild it") from None
        if emb.ndim != 2 or emb.shape[0] != len(bank.entries):
            raise BankError(f"{path}: {emb.shape[0] if emb.ndim else 0} embeddings but {len(bank.entries)} "
                            f"reference records")
        emb = emb.to(torch.float32)
        bad_rows = (~torch.isfinite(emb)).any(dim=1).nonzero().flatten().tolist()
        if bad_rows:
            shown = ", ".join(f"{bank.entries[i].id} ({bank.entries[i].class_name})" for i in bad_rows[:5])
            more = f" and {len(bad_rows) - 5} more" if len(bad_rows) > 5 else ""
            raise BankError(f"{damaged}: {len(bad_rows)} embedding(s) hold NaN or infinite values "
                            f"(reference {shown}{more}); rebuild it")
        bank._embeddings = list(emb.unbind(0))
        if encoder_settings is not None:
            bank.check_encoder(encoder_settings)
        return bank

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}: {n}" for c, n in self.counts().items())
        return f"MemoryBank({len(self.class_names)} classes, {len(self)} references; {counts})"
