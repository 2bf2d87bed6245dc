"""Typed settings for every stage, with ``default``, ``paper`` and ``fast`` as named presets.

Every number of the published method lives here, nowhere else. A preset is a
complete :class:`PipelineConfig`; change one field with :func:`dataclasses.replace`
or :meth:`PipelineConfig.with_overrides`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ReferenceConfig:
    """How one annotated reference instance becomes an embedding (METHOD.md section 1)."""

    context_scale: float = 1.2  # crop side = context_scale * max(box w, box h)
    min_mask_weight: float = 1e-6  # total soft-mask weight on the patch grid below this: reference unusable


@dataclass(frozen=True)
class ProposalConfig:
    """SAM2 automatic proposals from a point grid (METHOD.md section 2, steps 1 and 3)."""

    image_size: int = 1024  # target image squashed to image_size x image_size (aspect not kept)
    points_per_side: int = 32  # grid of points_per_side**2 single positive point prompts
    prompt_batch_size: int = 256  # prompts per decoder call
    pred_iou_threshold: float = 0.4  # keep proposals with predicted IoU strictly above this
    add_no_mem_embed: bool = False  # SAM2's video-path embedding; the paper does not add it
    # Decoder with the prompt-independent image-side work done once per image and the IoU threshold
    # applied once per image (refseg.models.sam2_fast_decoder); the same function up to rounding.
    fast_decoder: bool = False


@dataclass(frozen=True)
class MatchConfig:
    """Proposal feature pooling and class assignment (METHOD.md section 2, steps 2, 4, 5)."""

    mask_threshold: float = 0.0  # logit threshold for the binary low-resolution mask
    negative_margin: float = 0.0  # a class is vetoed when a negative of it is closer than prototype + margin


@dataclass(frozen=True)
class MergeConfig:
    """NMS, semantic-aware soft merging and top-k (METHOD.md section 2, steps 6 to 9)."""

    nms_iou: float = 0.5  # class-aware box NMS threshold, ranked by predicted IoU
    max_after_nms: int = 800  # keep the first N after NMS
    soft_merge: bool = True  # semantic-aware soft merging of overlapping same-class masks
    top_k: int = 100  # detections kept per image
    score_threshold: float = 0.0  # detections scoring below this are dropped after merging (paper: none)
    merge_resolution: int | None = None  # None: IoS at full image resolution (paper); N: on an N x N grid


@dataclass(frozen=True)
class OutputConfig:
    """How results are expressed.

    Detections always carry exact boxes (``x2, y2`` exclusive: the mask's true extent), and
    FiftyOne labels are always exact (a FiftyOne mask is cropped to its box). ``paper_box``
    concerns COCO *results files* only (:meth:`refseg.Detections.to_coco`, as ``refseg
    predict`` writes them): the reference's box from inclusive pixel indices, one pixel short
    of the mask in width and height. It is True in the ``paper`` preset only, to reproduce
    the published box AP.
    """

    paper_box: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    """All settings of one run. The defaults are the paper's method with exact boxes;
    ``PRESETS['paper']`` reproduces the published numbers (also its one-pixel-short COCO boxes)."""

    name: str = "default"
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    proposal: ProposalConfig = field(default_factory=ProposalConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    precision: Precision = "fp32"  # autocast dtype for the networks; paper mode is fp32

    def with_overrides(self, **overrides: Any) -> "PipelineConfig":
        """Return a copy with dotted overrides, e.g. ``{"merge.top_k": 50, "precision": "bf16"}``."""
        cfg = self
        for key, value in overrides.items():
            cfg = _replace_dotted(cfg, key.split("."), value)
        return cfg

    def to_dict(self) -> dict:
        """Plain nested dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        sections = {
            "reference": ReferenceConfig,
            "proposal": ProposalConfig,
            "match": MatchConfig,
            "merge": MergeConfig,
            "output": OutputConfig,
        }
        kwargs = {}
        for key, value in data.items():
            if key in sections:
                kwargs[key] = sections[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _replace_dotted(obj: Any, path: list[str], value: Any) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise KeyError(f"cannot set {'.'.join(path)!r}: not a settings section")
    names = {f.name: f for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise KeyError(f"unknown setting {head!r}; known: {', '.join(sorted(names))}")
    if len(path) == 1:
        current = getattr(obj, head)
        if isinstance(current, bool) and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, str):
            value = type(current)(value)
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: _replace_dotted(getattr(obj, head), path[1:], value)})


# The paper's method with exact boxes: what a user labelling their own data gets.
DEFAULT = PipelineConfig()

# The published numbers, bit for bit: the same settings plus the reference's one-pixel-short
# COCO result boxes (OutputConfig.paper_box).
PAPER = PipelineConfig(name="paper", output=OutputConfig(paper_box=True))

# Faster settings that keep the method: half precision networks, the many-prompt
# SAM2 decoder with larger prompt batches, and IoS on a 256 grid. Agreement with
# paper mode is checked in tests/test_fast_mode.py.
FAST = PipelineConfig(
    name="fast",
    precision="bf16",
    proposal=ProposalConfig(fast_decoder=True, prompt_batch_size=512),
    merge=MergeConfig(merge_resolution=256),
)

PRESETS: dict[str, PipelineConfig] = {"default": DEFAULT, "paper": PAPER, "fast": FAST}


def get_preset(name: str) -> PipelineConfig:
    """Look up a preset by name with a helpful error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
