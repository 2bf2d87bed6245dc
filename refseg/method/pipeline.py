"""Inference on target images (docs/method.md section 2).

Two stages, so the expensive one can be cached and the cheap one re-run when the
references or the merging settings change:

1. :meth:`Segmenter.propose` — networks: image -> :class:`Candidates` (proposal
   logits, predicted IoU, pooled unit-norm features). Depends only on the models.
2. :meth:`Segmenter.label` — no networks: candidates + memory bank -> matching,
   NMS, full-resolution masks, soft merging, top-k -> :class:`Detections`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from refseg.method.config import PAPER, PipelineConfig
from refseg.method.identity import bank_digest, component_identity, run_identity
from refseg.io.images import load_image
from refseg.method.interfaces import FeatureEncoder, ProposalGenerator, supports_prompt_selection
from refseg.method.matching import match_to_prototypes, pool_features
from refseg.method.memory_bank import MemoryBank
from refseg.method.prompt_selection import (PromptSelectionError, point_patches, prompt_similarities,
                                            resolve_prompt_threshold)
from refseg.method.rescoring import rescore_by_diffusion
from refseg.method.thresholds import apply_thresholds, stored_thresholds
from refseg.method.merging import class_aware_nms, mask_boxes, soft_merge_scores, top_k, upsampled_intersections
from refseg.method.precision import autocast
from refseg.method.preprocess import resize_for_encoder, squash_to_square
from refseg.method.results import Detections
from refseg.method.upsampling import window_masks

ImageInput = "str | os.PathLike | np.ndarray | PIL.Image.Image"

STAGE1_VERSION = 1  # bump when Segmenter.propose changes what it computes: older candidate caches are then refused


@dataclass
class Candidates:
    """Class-agnostic proposals of one image with their features (stage 1 output).

    logits:   [N, h, w] float mask logits in the square model frame.
    pred_iou: [N] float.
    features: [N, D] unit-norm pooled features.
    image_size: (H, W) of the original image.
    prompt_index: optional [N] int64, the proposer's prompt of each candidate (when it reports them).
    prompt_similarities: optional [P] float, per prompt of the image its highest cosine to a class prototype
        (with prompt selection, or ``Segmenter.propose(..., with_prompt_similarities=True)``). Neither is kept
        by a candidate cache.
    """

    logits: torch.Tensor
    pred_iou: torch.Tensor
    features: torch.Tensor
    image_size: tuple[int, int]
    prompt_index: torch.Tensor | None = None
    prompt_similarities: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.pred_iou.shape[0])

    def to(self, device: torch.device | str) -> "Candidates":
        return Candidates(self.logits.to(device), self.pred_iou.to(device), self.features.to(device), self.image_size,
                          *(None if t is None else t.to(device) for t in (self.prompt_index, self.prompt_similarities)))


@dataclass
class PreparedImage:
    """An image read ahead of the networks (:meth:`Segmenter.prepare`): its cached candidates, or its pixels."""

    key: str | None = None  # candidate-cache key
    candidates: Candidates | None = None  # a cache hit
    rgb: np.ndarray | None = None  # [H, W, 3] uint8, when there is no hit
    source: str | os.PathLike | None = None  # the image file, when it came from one

    @classmethod
    def read(cls, image, key: str | None = None, candidates: Candidates | None = None) -> "PreparedImage":
        """``image`` (path, PIL image or array) decoded unless its ``candidates`` are given."""
        return cls(key=key, candidates=candidates, rgb=None if candidates is not None else load_image(image),
                   source=image if isinstance(image, (str, os.PathLike)) else None)


class CandidateStore(Protocol):
    """What the pipeline asks of a store of stage-1 outputs (e.g.
    :class:`refseg.runtime.candidate_cache.CandidateCache`; the method layer imports no implementation).

    ``bind`` ties the store to a segmenter's :meth:`Segmenter.stage1_settings` (refusing other
    settings); ``get`` returns the candidates stored under a key (None when there are none).
    """

    def key_of(self, image) -> str: ...

    def bind(self, settings: dict) -> None: ...

    def get(self, key: str, device=None) -> "Candidates | None": ...

    def put(self, key: str, cand: "Candidates"): ...


def cache_key(image, cache: CandidateStore | None, key: str | None = None) -> str | None:
    """The candidate-cache key of ``image``: ``key`` when given, else the cache's default; None without a cache."""
    if cache is None:
        if key is not None:
            raise ValueError("keys are only used with a cache")
        return None
    return cache.key_of(image) if key is None else str(key)


class Segmenter:
    """Labels images with instance masks of the memory bank's classes.

    >>> seg = Segmenter(proposer, encoder, MemoryBank.load("bank.safetensors"))
    >>> dets = seg.predict("image.jpg")     # Detections: masks, boxes, scores, labels
    """

    def __init__(self, proposer: ProposalGenerator, encoder: FeatureEncoder, bank: MemoryBank,
                 config: PipelineConfig = PAPER):
        self.proposer = proposer
        self.encoder = encoder
        self.config = config
        self._stage1_memo: tuple | None = None  # (models and settings it was computed for, stage1_settings())
        self.set_bank(bank)

    def set_bank(self, bank: MemoryBank) -> None:
        """Use another (or an edited) bank; checks it matches the encoder and is not empty."""
        bank.check_encoder(self.encoder.settings())
        bank.check_usable()
        # the bank's per-class thresholds, when the settings apply them (refused if none or stale)
        self._thresholds = stored_thresholds(bank) if self.config.merge.class_thresholds else None
        # the prompt-selection threshold (refused if "bank" and none or stale; needs a proposer with prompts)
        self._prompt_threshold = resolve_prompt_threshold(self.config.proposal.prompt_similarity, bank)
        if self._prompt_threshold is not None and not supports_prompt_selection(self.proposer):
            raise PromptSelectionError(
                f"proposal.prompt_similarity needs a proposer with prompt points (prompt_points and "
                f"propose(images, prompt_mask=...)); {type(self.proposer).__name__} has none: leave the setting off")
        self.bank = bank
        self.class_names = list(bank.class_names)
        self._prototypes = bank.prototypes()
        self._negatives, self._negative_labels = bank.embeddings(negative=True)

    def identity(self) -> dict:
        """What determines this segmenter's results (:func:`refseg.method.identity.run_identity`)."""
        return run_identity(self.config, component_identity(self.proposer), component_identity(self.encoder),
                            self.bank)

    def stage1_settings(self) -> dict:
        """Everything that determines the :class:`Candidates` of an image (what a candidate store is bound to):
        the proposer's and the encoder's identity, the proposal settings, precision and mask threshold.

        Computed once per set of models and stage-1 settings (the identities fingerprint weights);
        the same dict object is returned until one of them changes.
        """
        cfg = self.config
        selection = None if self._prompt_threshold is None else (self._prompt_threshold, id(self.bank))
        state = (id(self.proposer), id(self.encoder), cfg.proposal, cfg.precision, cfg.match.mask_threshold,
                 selection)
        memo = self._stage1_memo
        if memo is None or memo[0] != state:
            proposal = dataclasses.asdict(cfg.proposal)
            del proposal["prompt_similarity"]  # off: the settings of caches written before the option existed
            settings = {"stage1_version": STAGE1_VERSION,
                        "proposer": component_identity(self.proposer),
                        "encoder": component_identity(self.encoder),
                        "proposal": proposal,
                        "precision": cfg.precision,
                        "mask_threshold": float(cfg.match.mask_threshold)}
            if selection is not None:  # the candidates then depend on the bank's prototypes too
                settings["prompt_selection"] = {"threshold": self._prompt_threshold,
                                                "bank": bank_digest(self.bank)}
            memo = (state, settings)
            self._stage1_memo = memo
        return memo[1]

    def close(self) -> None:
        """Nothing to release (the models stay usable); here so that a Segmenter and a
        :class:`~refseg.runtime.device_pool.DevicePool` are used alike by a labelling job."""

    # ------------------------------------------------------------------ stage 1
    def propose(self, images: Sequence[np.ndarray], with_prompt_similarities: bool = False) -> list[Candidates]:
        """Run the networks on RGB uint8 images: proposals and pooled features per image.

        The encoder runs first; with ``proposal.prompt_similarity`` only the prompts whose patch feature is
        that close to a class prototype are decoded (:mod:`refseg.method.prompt_selection`).
        ``with_prompt_similarities``: also give each candidate's prompt similarities (the proposer must
        have prompt points), as prompt selection does.
        """
        if not images:
            return []
        cfg = self.config
        s = cfg.proposal.image_size
        squares = torch.stack([squash_to_square(im, s) for im in images])  # [B, 3, S, S]
        with torch.inference_mode():
            enc_in = resize_for_encoder(squares.to(self.encoder.device), self.encoder.input_size)
            with autocast(self.encoder.device, cfg.precision):
                patch_features = self.encoder.encode(enc_in).float()  # [B, g, g, D]
            similarities, prompt_mask = None, None
            if self._prompt_threshold is not None or with_prompt_similarities:
                similarities = self.prompt_similarities(patch_features)  # [B, P]
            if self._prompt_threshold is not None:
                prompt_mask = similarities >= self._prompt_threshold
            with autocast(self.proposer.device, cfg.precision):
                squares = squares.to(self.proposer.device)
                proposals = (self.proposer.propose(squares) if prompt_mask is None
                             else self.proposer.propose(squares, prompt_mask=prompt_mask))
            out = []
            for b, (im, props, feats) in enumerate(zip(images, proposals, patch_features)):
                logits = props.logits.float()
                masks = logits > cfg.match.mask_threshold
                features, valid = pool_features(masks.to(feats.device), feats)
                valid = valid.to(logits.device)
                index = None if props.prompt_index is None else props.prompt_index[valid.to(props.prompt_index.device)]
                out.append(Candidates(logits[valid], props.pred_iou.float()[valid], features[valid.to(features.device)],
                                      (int(im.shape[0]), int(im.shape[1])), index,
                                      None if similarities is None else similarities[b]))
        return out

    def prompt_similarities(self, patch_features: torch.Tensor) -> torch.Tensor:
        """``[B, P]`` per prompt of the proposer, the highest cosine of the patch feature under it (``[B, g, g, D]``
        from the encoder) to a class prototype of the bank."""
        if getattr(self.proposer, "prompt_points", None) is None:
            raise PromptSelectionError(f"{type(self.proposer).__name__} has no prompt points to select")
        patches = point_patches(self.proposer.prompt_points.cpu(), self.config.proposal.image_size,
                                self.encoder.input_size, self.encoder.patch_size)
        return prompt_similarities(patch_features, self._prototypes, patches)

    # ------------------------------------------------------------------ stage 2
    def label(self, cand: Candidates) -> Detections:
        """Match candidates to the bank, remove duplicates, merge and keep the top k (and, with
        ``merge.class_thresholds``, those that pass their class's threshold). Each detection's
        ``candidate_index`` is the place of its proposal in ``cand``."""
        dets = self._match_and_merge(cand)
        return dets if self._thresholds is None else apply_thresholds(dets, self._thresholds)

    def _match_and_merge(self, cand: Candidates) -> Detections:
        cfg = self.config
        h, w = cand.image_size
        if len(cand) == 0:
            return Detections.empty(h, w, self.class_names)
        device = cand.logits.device
        with torch.inference_mode():
            features = cand.features.to(device)
            scores, labels, _ = match_to_prototypes(
                features, self._prototypes.to(device), self._negatives.to(device),
                self._negative_labels.to(device), cfg.match.negative_margin)
            low_masks = cand.logits > cfg.match.mask_threshold
            keep = class_aware_nms(mask_boxes(low_masks), cand.pred_iou, labels, cfg.merge.nms_iou,
                                   cfg.merge.max_after_nms)
            keep = keep[scores[keep] > 0]
            if keep.numel() == 0:
                return Detections.empty(h, w, self.class_names)
            logits, scores, labels = cand.logits[keep], scores[keep], labels[keep]
            pred_iou, features = cand.pred_iou[keep], features[keep]
            threshold = cfg.match.mask_threshold
            if cfg.merge.soft_merge or cfg.rescore.diffusion:
                # paper: overlaps at full image resolution; merge_resolution r: on an r x r grid
                r = cfg.merge.merge_resolution
                inter = upsampled_intersections(logits, labels, (r, r) if r else (h, w), threshold)
                if cfg.rescore.diffusion:
                    scores = rescore_by_diffusion(inter, scores, labels, pred_iou, features, cfg.rescore)
                else:
                    scores = soft_merge_scores(inter, scores, labels, pred_iou, features)
            best = top_k(scores, cfg.merge.top_k, cfg.merge.score_threshold)
            # only the kept masks at full resolution, each inside its window, held as tight bit-crops
            windows, crops = window_masks(logits[best], (h, w), threshold)
            return Detections.from_crops(  # exact boxes; the paper box only in COCO results (to_coco)
                (h, w), [[x0, y0, x1, y1] for y0, y1, x0, x1 in windows], crops,
                scores=scores[best].float().cpu().numpy(),
                labels=labels[best].cpu().numpy().astype(np.int64),
                class_names=self.class_names,
                pred_iou=pred_iou[best].float().cpu().numpy(),
                candidate_index=keep[best].cpu().numpy().astype(np.int64),  # which proposal each detection is
            )

    # ------------------------------------------------------------------ reading ahead
    def prepare(self, image, cache: CandidateStore | None = None, key: str | None = None) -> "PreparedImage":
        """Read what labelling ``image`` needs, ahead of the networks (safe in a reader thread).

        Without ``cache``: the decoded image. With ``cache`` (a :class:`CandidateStore`, bound here to
        :meth:`stage1_settings`): the image's stored candidates when
        there is an entry (no image decode), else the decoded image; ``key`` replaces the
        default key (path + size + mtime, or pixels). Raises :class:`~refseg.io.images.ImageLoadError`.
        """
        key = cache_key(image, cache, key)
        if cache is None:
            return PreparedImage.read(image)
        cache.bind(self.stage1_settings())
        return PreparedImage.read(image, key, cache.get(key, self.proposer.device))

    def label_prepared(self, items: Sequence["PreparedImage"], cache: CandidateStore | None = None
                       ) -> list[Detections]:
        """Label prepared images: the networks run on the ones without candidates, as one batch
        (stored in ``cache`` when given), then every image is labelled (:meth:`label`)."""
        cands = [item.candidates for item in items]
        misses = [i for i, c in enumerate(cands) if c is None]
        for i, cand in zip(misses, self.propose([items[i].rgb for i in misses])):
            if cache is not None and items[i].key is not None:
                cache.put(items[i].key, cand)
            cands[i] = cand
        return [self.label(c) for c in cands]

    # ------------------------------------------------------------------ convenience
    def predict(self, image, cache=None, key: str | None = None) -> Detections:
        """Label one image (path, PIL image or array); ``cache``/``key`` as in :meth:`predict_batch`."""
        return self.predict_batch([image], cache=cache, keys=None if key is None else [key])[0]

    def predict_batch(self, images: Sequence, cache=None, keys: Sequence[str] | None = None) -> list[Detections]:
        """Label a batch of images; the networks see them as one batch.

        With ``cache`` (a :class:`~refseg.runtime.candidate_cache.CandidateCache`), stage 1 of an image
        found in it is read from disk (no network, no image decode) and stage 1 of the others
        is computed and stored; ``keys`` replace the default keys (path + size + mtime, or pixels).
        """
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        keys = list(keys) if keys is not None else [None] * len(images)
        return self.label_prepared([self.prepare(im, cache, k) for im, k in zip(images, keys)], cache)

    def predict_many(self, images: Iterable, batch_size: int = 1, cache=None) -> Iterator[Detections]:
        """Label an iterable of images lazily, ``batch_size`` at a time, in order (``cache``: see predict_batch)."""
        batch: list = []
        for im in images:
            batch.append(im)
            if len(batch) == batch_size:
                yield from self.predict_batch(batch, cache=cache)
                batch = []
        if batch:
            yield from self.predict_batch(batch, cache=cache)
