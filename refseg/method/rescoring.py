"""Graph-diffusion re-scoring of overlapping detections (FSOD-VFM's rule, docs/method.md section 6).

Per image and per predicted class, the detections are the nodes of a graph ranked by a
class-agnostic quality (SAM's predicted IoU by default). An edge runs from each node i
to every node j ranked above it, weighted by how much of i the other covers,
``A[i, j] = IoS(i, j) = |M_i ∩ M_j| / |M_i|`` (times ``max(0, f_i . f_j)`` with the
semantic factor). ``w_i = max_j A[i, j]`` is how much i is a part of something better;
a penalty ``pi`` spreads it down the ranking,

    pi <- alpha * P @ pi + (1 - alpha) * w      (pi starts at 1/m; P = A, or A row-normalised)

for at most ``steps`` steps, stopping once the L2 change is below ``tolerance``, and
``score_i *= max(0, 1 - pi_i) ** exponent``. A fragment of a fragment of an object thus
loses more than a fragment of the object.

With ``alpha = 0`` the penalty is ``w`` itself and, with the semantic factor and the
exponent 1/2, the rule is the paper's semantic-aware soft merging
(:func:`refseg.method.merging.soft_merge_scores`) bit for bit; the paper's presets keep
calling that function. Since ``P`` is strictly lower triangular in rank order, for
``m <= steps`` nodes the iteration reaches the fixed point exactly; :func:`forward_substitution`
computes it directly.
"""

from __future__ import annotations

import torch

from refseg.method.config import RANKINGS, RescoreConfig
from refseg.method.merging import overlap_edges



def ranking_key(name: str, pred_iou: torch.Tensor, scores: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
    """The quality that orders the nodes: SAM's predicted IoU, the class score, or the mask area
    (the diagonal of the intersection counts, at the resolution they were counted)."""
    if name == "pred_iou":
        return pred_iou
    if name == "score":
        return scores
    if name == "area":
        return inter.diagonal().to(torch.float32)
    raise ValueError(f"unknown ranking {name!r}; choose one of {', '.join(RANKINGS)}")


def diffusion_penalty(edges: torch.Tensor, labels: torch.Tensor, alpha: float, steps: int, tolerance: float,
                      row_normalise: bool) -> torch.Tensor:
    """The penalty ``pi`` [N] of every node, iterated per class (see the module docstring)."""
    pi = torch.zeros(edges.shape[0], dtype=edges.dtype, device=edges.device)
    for cls in labels.unique():
        idx = (labels == cls).nonzero().squeeze(1)
        a = edges[idx.unsqueeze(1), idx.unsqueeze(0)]
        w = a.max(dim=1).values
        p = a / a.sum(dim=1, keepdim=True).clamp(min=torch.finfo(a.dtype).tiny) if row_normalise else a
        if alpha == 0:
            pi[idx] = w  # the fixed point at once (and exactly: no 0 * P @ pi rounding)
            continue
        cur = torch.full_like(w, 1.0 / idx.numel())
        for _ in range(steps):
            nxt = alpha * (p @ cur) + (1.0 - alpha) * w
            change = torch.linalg.vector_norm(nxt - cur)
            cur = nxt
            if change < tolerance:
                break
        pi[idx] = cur
    return pi


def forward_substitution(edges: torch.Tensor, order: torch.Tensor, alpha: float, row_normalise: bool) -> torch.Tensor:
    """The fixed point of the iteration for one class, in closed form: nodes in rank order ``order``
    (best first), ``pi_i = (1 - alpha) w_i + alpha sum_{j above i} P[i, j] pi_j``. For checks and small graphs."""
    w = edges.max(dim=1).values
    p = edges / edges.sum(dim=1, keepdim=True).clamp(min=torch.finfo(edges.dtype).tiny) if row_normalise else edges
    pi = torch.zeros_like(w)
    for i in order.tolist():
        pi[i] = (1.0 - alpha) * w[i] + alpha * (p[i] * pi).sum()
    return pi


def diffusion_rescore(inter: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, ranking: torch.Tensor,
                      features: torch.Tensor | None, *, alpha: float = 0.3, exponent: float = 0.5, steps: int = 30,
                      tolerance: float = 1e-6, row_normalise: bool = False) -> torch.Tensor:
    """Re-scored ``scores`` from the same-class intersection counts ``inter`` [N, N] (areas on the diagonal).

    ``ranking`` orders the nodes (ties: the earlier index ranks higher); ``features`` [N, D]
    (unit vectors) give the semantic factor, None leaves it out.
    """
    if scores.shape[0] < 2:
        return scores.clone()
    edges = overlap_edges(inter, labels, ranking, features)
    pi = diffusion_penalty(edges, labels, alpha, steps, tolerance, row_normalise)
    kept = (1.0 - pi).clamp(min=0.0)
    return scores * (torch.sqrt(kept) if exponent == 0.5 else kept ** exponent)


def rescore_by_diffusion(inter: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, pred_iou: torch.Tensor,
                         features: torch.Tensor, cfg: RescoreConfig) -> torch.Tensor:
    """:func:`diffusion_rescore` with the settings of ``cfg`` (the pipeline's call)."""
    return diffusion_rescore(inter, scores, labels, ranking_key(cfg.ranking, pred_iou, scores, inter),
                             features if cfg.semantic else None, alpha=cfg.alpha, exponent=cfg.exponent,
                             steps=cfg.steps, tolerance=cfg.tolerance, row_normalise=cfg.row_normalise)
