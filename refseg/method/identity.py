"""What identifies a labelling run's output, in one place.

A run's results are determined by the proposal model and its weights, the feature encoder
and its weights, the memory bank's content and every setting. :func:`run_identity` puts
them in one JSON-able dict and :func:`identity_key` hashes it. A resumed ``refseg predict``
refuses a progress file of another identity, the FiftyOne plugin relabels samples written
under another identity, and the candidate cache files its entries under the stage-1 part
of it, so a changed checkpoint, bank file or setting is never mixed into earlier results.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def bank_digest(bank) -> str:
    """Hash of what a bank contributes to labelling: class names, prototypes and negatives."""
    digest = hashlib.sha256(json.dumps(list(bank.class_names)).encode())
    negatives, negative_labels = bank.embeddings(negative=True)
    for tensor in (bank.prototypes(), negatives, negative_labels):
        arr = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


def component_identity(component) -> dict:
    """A model wrapper's identity: its class and its ``settings()`` (which carry its weights' content)."""
    cls = type(component)
    return jsonable({"class": f"{cls.__module__}.{cls.__qualname__}", **component.settings()})


def run_identity(config, proposer: dict, encoder: dict, bank) -> dict:
    """The identity of labelling with these models (their :func:`component_identity`), bank and config
    (with the bank's class thresholds when the config applies them, and its prompt threshold when the config
    takes it from the bank)."""
    settings = config.to_dict()
    if settings["proposal"]["prompt_similarity"] is None:  # off: the identity of runs recorded before the option
        del settings["proposal"]["prompt_similarity"]
    identity = {
        "config": settings,
        "proposer": proposer,
        "encoder": encoder,
        "classes": list(bank.class_names),
        "bank": bank_digest(bank),
    }
    if config.merge.class_thresholds:
        identity["thresholds"] = bank.thresholds
    if config.proposal.prompt_similarity == "bank":
        identity["prompt_similarity"] = bank.prompt_similarity
    return jsonable(identity)


def identity_key(identity: dict) -> str:
    """Short stable hash of an identity dict (or of any JSON-able settings)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_difference(recorded: dict, current: dict) -> str:
    """Which top-level parts of two identities differ, for messages ("proposer, bank")."""
    keys = sorted(set(recorded) | set(current))
    changed = [k for k in keys if recorded.get(k) != current.get(k)]
    return ", ".join(changed) or "nothing"


def jsonable(obj: Any) -> Any:
    """Round-trip through JSON (keys sorted) so that comparisons with a loaded record or manifest are like for
    like (tuples become lists, other objects their text)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))
