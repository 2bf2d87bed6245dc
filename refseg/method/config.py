"""Typed settings for every stage, with ``default``, ``paper`` and ``fast`` as named presets.

Every number of the published method lives here, nowhere else. A preset is a
complete :class:`PipelineConfig`; change one field with :func:`dataclasses.replace`
or :meth:`PipelineConfig.with_overrides`.

Every setting is checked when a section is made (so also after ``replace``,
``with_overrides`` and ``from_dict``): a value of the wrong type or outside its
range raises :class:`ValueError` naming the setting (``merge.top_k``) and what it
accepts. The ranges are in :data:`RULES`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from refseg.errors import InvalidInput, UnknownName

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
RANKINGS: tuple[str, ...] = ("pred_iou", "score", "area")  # what orders detections in graph-diffusion re-scoring


# ---------------------------------------------------------------------------- validation


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# kind of value -> (test, words for the error message)
_positive_int: tuple[Callable[[Any], bool], str] = (lambda v: _is_int(v) and v >= 1, "a positive integer (>= 1)")
_flag = (lambda v: isinstance(v, bool), "true or false")
_finite = (_is_number, "a finite number")

# "section.field" -> (test, what it accepts). Checked by every section's __post_init__.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "reference.context_scale": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "reference.min_mask_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "proposal.image_size": _positive_int,
    "proposal.points_per_side": _positive_int,
    "proposal.prompt_batch_size": _positive_int,
    # predicted IoUs lie in [0, 1]: 1 keeps nothing, a negative threshold keeps every proposal
    "proposal.pred_iou_threshold": (lambda v: _is_number(v) and v <= 1, "a number <= 1 (IoU; negative: keep all)"),
    "proposal.add_no_mem_embed": _flag,
    "proposal.fast_decoder": _flag,
    "proposal.prompt_similarity": (lambda v: v is None or v == "bank" or (_is_number(v) and -1 <= v <= 1),
                                   "null (off), 'bank' (the threshold stored with the bank) or a cosine in [-1, 1]"),
    "match.mask_threshold": _finite,
    "match.negative_margin": _finite,
    "merge.nms_iou": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1] (IoU)"),
    "merge.max_after_nms": _positive_int,
    "merge.soft_merge": _flag,
    "merge.top_k": _positive_int,
    "merge.score_threshold": _finite,
    "merge.merge_resolution": (lambda v: v is None or (_is_int(v) and v >= 1), "null or a positive integer"),
    "merge.class_thresholds": _flag,
    "rescore.diffusion": _flag,
    "rescore.alpha": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "rescore.exponent": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "rescore.steps": _positive_int,
    "rescore.tolerance": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "rescore.row_normalise": _flag,
    "rescore.semantic": _flag,
    "rescore.ranking": (lambda v: v in RANKINGS, f"one of {', '.join(RANKINGS)}"),
    "output.paper_box": _flag,
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "name": (lambda v: isinstance(v, str), "a string"),
}


def _validate(obj: Any, section: str | None) -> None:
    """Raise :class:`ValueError` for the first field of ``obj`` that breaks its rule in :data:`RULES`."""
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        rule = RULES.get(key)
        if rule is None:
            continue
        value = getattr(obj, f.name)
        test, accepted = rule
        if not test(value):
            raise InvalidInput(f"setting {key} must be {accepted}, got {value!r}")


@dataclass(frozen=True)
class ReferenceConfig:
    """How one annotated reference instance becomes an embedding (docs/method.md section 1)."""

    context_scale: float = 1.2  # crop side = context_scale * max(box w, box h)
    min_mask_weight: float = 1e-6  # total soft-mask weight on the patch grid below this: reference unusable

    def __post_init__(self) -> None:
        _validate(self, "reference")


@dataclass(frozen=True)
class ProposalConfig:
    """SAM2 automatic proposals from a point grid (docs/method.md section 2, steps 1 and 3)."""

    image_size: int = 1024  # target image squashed to image_size x image_size (aspect not kept)
    points_per_side: int = 32  # grid of points_per_side**2 single positive point prompts
    prompt_batch_size: int = 256  # prompts per decoder call
    pred_iou_threshold: float = 0.4  # keep proposals with predicted IoU strictly above this
    add_no_mem_embed: bool = False  # SAM2's video-path embedding; the paper does not add it
    # Decoder with the prompt-independent image-side work done once per image and the IoU threshold
    # applied once per image (refseg.models.sam2_fast_decoder); the same function up to rounding.
    fast_decoder: bool = False
    # Opt-in speed (refseg.method.prompt_selection): decode only the grid prompts whose patch feature has cosine
    # >= this to some class prototype; "bank": the threshold `refseg calibrate --prompt-share` stored with the
    # bank; None (every preset): every prompt is decoded.
    prompt_similarity: float | str | None = None

    def __post_init__(self) -> None:
        _validate(self, "proposal")


@dataclass(frozen=True)
class MatchConfig:
    """Proposal feature pooling and class assignment (docs/method.md section 2, steps 2, 4, 5)."""

    mask_threshold: float = 0.0  # logit threshold for the binary low-resolution mask
    negative_margin: float = 0.0  # a class is vetoed when a negative of it is closer than prototype + margin

    def __post_init__(self) -> None:
        _validate(self, "match")


@dataclass(frozen=True)
class MergeConfig:
    """NMS, semantic-aware soft merging and top-k (docs/method.md section 2, steps 6 to 9)."""

    nms_iou: float = 0.5  # class-aware box NMS threshold, ranked by predicted IoU
    max_after_nms: int = 800  # keep the first N after NMS
    soft_merge: bool = True  # semantic-aware soft merging of overlapping same-class masks
    top_k: int = 100  # detections kept per image
    score_threshold: float = 0.0  # detections scoring below this are dropped after merging (paper: none)
    merge_resolution: int | None = None  # None: IoS at full image resolution (paper); N: on an N x N grid
    # drop detections below their class's threshold stored with the bank (refseg calibrate; refseg.method.thresholds)
    class_thresholds: bool = False

    def __post_init__(self) -> None:
        _validate(self, "merge")


@dataclass(frozen=True)
class RescoreConfig:
    """Graph-diffusion re-scoring (FSOD-VFM's rule, docs/method.md section 6), which generalises soft
    merging. Off in the ``default``, ``paper`` and ``fast`` presets; the ``diffusion`` preset turns it on
    with FSOD-VFM's settings. When on, it replaces ``merge.soft_merge`` (IoS counted as
    ``merge.merge_resolution`` says); ``alpha = 0`` with ``semantic`` is soft merging itself."""

    diffusion: bool = False
    alpha: float = 0.3  # share of the penalty passed down the ranking each step
    exponent: float = 0.5  # lambda: score *= max(0, 1 - penalty) ** exponent
    steps: int = 30  # at most this many iterations...
    tolerance: float = 1e-6  # ...stopping when the L2 change of the penalties is below this
    row_normalise: bool = False  # P = A row-normalised (FSOD-VFM's paper) or A itself (its released code)
    semantic: bool = False  # weigh each overlap by max(0, cosine of the two detections' features)
    ranking: str = "pred_iou"  # node order: SAM's predicted IoU, the class score, or the mask area

    def __post_init__(self) -> None:
        _validate(self, "rescore")


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

    def __post_init__(self) -> None:
        _validate(self, "output")


@dataclass(frozen=True)
class PipelineConfig:
    """All settings of one run. The defaults are the paper's method with exact boxes;
    ``PRESETS['paper']`` reproduces the published numbers (also its one-pixel-short COCO boxes)."""

    name: str = "default"
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    proposal: ProposalConfig = field(default_factory=ProposalConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    rescore: RescoreConfig = field(default_factory=RescoreConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    precision: Precision = "fp32"  # autocast dtype for the networks; paper mode is fp32

    def __post_init__(self) -> None:
        for name, kind in _SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise InvalidInput(f"setting {name} must be a {kind.__name__} (a section of settings), "
                                 f"got {getattr(self, name)!r}")
        _validate(self, None)

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
        kwargs = {}
        for key, value in data.items():
            if key in _SECTIONS:
                kwargs[key] = _SECTIONS[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "reference": ReferenceConfig,
    "proposal": ProposalConfig,
    "match": MatchConfig,
    "merge": MergeConfig,
    "rescore": RescoreConfig,
    "output": OutputConfig,
}

_OPTIONAL_INTS = ("merge.merge_resolution",)  # None or an integer: text is read as an integer (or none/null)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_text(key: str, current: Any, text: str) -> Any:
    """A setting given as text (``with_overrides(**{"merge.top_k": "50"})``), read as the type of its current value;
    a value that does not read as that type is a :class:`ValueError` naming the setting."""
    word = text.strip()
    if key == "proposal.prompt_similarity":  # null, "bank" or a number, whatever the current value
        if word.lower() in ("none", "null", "off"):
            return None
        if word.lower() == "bank":
            return "bank"
        try:
            return float(word)
        except ValueError:
            raise InvalidInput(f"setting {key} must be {RULES[key][1]}, got {text!r}") from None
    if isinstance(current, bool):
        if word.lower() in _TRUE:
            return True
        if word.lower() in _FALSE:
            return False
        raise InvalidInput(f"setting {key} must be true or false, got {text!r}")
    if isinstance(current, int) or (current is None and key in _OPTIONAL_INTS):
        if key in _OPTIONAL_INTS and word.lower() in ("none", "null"):
            return None
        try:
            return int(word)
        except ValueError:
            raise InvalidInput(f"setting {key} must be {RULES[key][1] if key in RULES else 'an integer'}, "
                             f"got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(word)
        except ValueError:
            raise InvalidInput(f"setting {key} must be {RULES[key][1] if key in RULES else 'a number'}, "
                             f"got {text!r}") from None
    return text


def _replace_dotted(obj: Any, path: list[str], value: Any, done: tuple[str, ...] = ()) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise UnknownName(f"cannot set {'.'.join(done + tuple(path))!r}: {'.'.join(done)} is not a settings section")
    names = {f.name: f for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        where = f" in section {'.'.join(done)}" if done else ""
        raise UnknownName(f"unknown setting {head!r}{where}; known: {', '.join(sorted(names))}")
    if len(path) == 1:
        current = getattr(obj, head)
        key = ".".join(done + (head,))
        if isinstance(value, str) and (not isinstance(current, str) or key == "proposal.prompt_similarity"):
            value = _parse_text(key, current, value)
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: _replace_dotted(getattr(obj, head), path[1:], value, done + (head,))})


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

# Beyond the paper: FSOD-VFM's graph-diffusion re-scoring instead of soft merging (alpha 0.3, lambda 0.5,
# no semantic factor, nodes ranked by SAM's predicted IoU), on this method's proposals (NMS kept: SAM2's point
# grid repeats objects far more than FSOD-VFM's box proposer).
DIFFUSION = PipelineConfig(name="diffusion", rescore=RescoreConfig(diffusion=True))

PRESETS: dict[str, PipelineConfig] = {"default": DEFAULT, "paper": PAPER, "fast": FAST, "diffusion": DIFFUSION}


def get_preset(name: str) -> PipelineConfig:
    """Look up a preset by name with a helpful error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownName(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
