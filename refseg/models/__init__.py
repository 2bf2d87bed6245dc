"""The bundled networks: SAM 2 mask proposals and DINOv2 / DINOv3 / C-RADIO patch features.

Importing this package is cheap: ``sam2`` (Hydra) and ``timm`` are imported
only when a model is built.
"""

from refseg.models.checkpoints import CheckpointError, CheckpointSpec, resolve_checkpoint
from refseg.models.dinov2_encoder import DINOV2_VARIANTS, DINOv2Encoder, DINOv2Variant, dinov2_variant
from refseg.models.sam2_proposer import (
    SAM2_VARIANTS,
    SAM2ProposalGenerator,
    SAM2Variant,
    load_sam2,
    point_grid,
    sam2_variant,
)
from refseg.models.registry import build_encoder, build_proposer, encoder_names, load_component
from refseg.models.timm_encoder import TIMM_VARIANTS, TimmEncoder, TimmVariant, timm_variant

__all__ = [
    "CheckpointError", "CheckpointSpec", "resolve_checkpoint",
    "DINOV2_VARIANTS", "DINOv2Encoder", "DINOv2Variant", "dinov2_variant",
    "SAM2_VARIANTS", "SAM2ProposalGenerator", "SAM2Variant", "load_sam2", "point_grid", "sam2_variant",
    "build_encoder", "build_proposer", "encoder_names", "load_component",
    "TIMM_VARIANTS", "TimmEncoder", "TimmVariant", "timm_variant",
]
