"""refseg: training-free reference-based instance segmentation.

A few annotated reference instances per class fill a :class:`MemoryBank` of
features; a proposal model (SAM2) proposes masks on every other image; each
proposal is matched to the bank, merged, scored and returned as :class:`Detections`.
"""

from refseg.errors import InvalidDetections, InvalidInput, RefsegError, UnknownName
from refseg.method.config import PAPER, PRESETS, MatchConfig, MergeConfig, OutputConfig, PipelineConfig, ProposalConfig, \
    ReferenceConfig, RescoreConfig, get_preset
from refseg.io.images import ImageLoadError, load_image
from refseg.method.interfaces import FeatureEncoder, ProposalGenerator, Proposals
from refseg.method.memory_bank import BankError, BankMismatchError, MemoryBank
from refseg.method.pipeline import Candidates, Segmenter
from refseg.method.references import BankReport, Reference, ReferenceEncoder, UnusableReference
from refseg.method.results import CompactMasks, Detections, decode_rle, encode_rle

__version__ = "0.1.0"

__all__ = [
    "RefsegError", "InvalidInput", "UnknownName", "InvalidDetections", "CompactMasks",
    "PAPER", "PRESETS", "MatchConfig", "MergeConfig", "OutputConfig", "PipelineConfig", "ProposalConfig",
    "ReferenceConfig", "RescoreConfig", "get_preset", "ImageLoadError", "load_image", "FeatureEncoder", "ProposalGenerator",
    "Proposals", "BankError", "BankMismatchError", "MemoryBank", "Candidates", "Segmenter", "BankReport",
    "Reference", "ReferenceEncoder", "UnusableReference", "Detections", "decode_rle", "encode_rle",
]
