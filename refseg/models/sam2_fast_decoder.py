"""SAM 2 mask decoding for many prompts on one image, with the prompt-independent work done once.

SAM2's :class:`~sam2.modeling.sam.mask_decoder.MaskDecoder` is written for a few
prompts: every call repeats the image embedding and its positional encoding per
prompt and projects them again. With a grid of ~1000 prompts per image most of
that work is the same for every prompt. :class:`FastMaskDecoder` computes the same
function as ``MaskDecoder(..., multimask_output=True)`` followed by "best of the
three multimask outputs by predicted IoU", reading the weights of the sam2 modules
(nothing is copied, nothing in the sam2 package is changed), in two steps:

``prepare`` (once per image) -- everything that does not depend on the prompt:

* ``src = image embedding + no-mask dense embedding`` and the dense positional
  encoding ``pe`` (both the same for every prompt when no mask is prompted);
* in the first transformer block, the image side is still ``src``: the key and value
  projections of token->image attention (``k_proj(src + pe)``, ``v_proj(src)``)
  and the query projection of image->token attention (``q_proj(src + pe)``);
* the high-resolution features (``conv_s0``/``conv_s1``, already applied by
  ``forward_image``), rearranged once into the layout the upscaling uses.

``decode`` (per batch of prompts, given their sparse prompt embeddings) -- the rest. After the first block's
image->token attention the image side depends on the prompt, so from there on
everything is per prompt. Because the prompt side is only ``T`` tokens (8 for
SAM 2.1: object score, IoU, 4 mask tokens, point, padding point), the per-prompt
attentions are evaluated in an algebraically equal but cheaper order:

* token->image attention (later blocks and the final one): the key projection is
  folded into the queries (``q . (W_k x + b_k) = (W_k^T q) . x + q . b_k``; the last
  term is the same for every key, so softmax ignores it) and the value projection
  is applied after the attention-weighted sum (rows of the attention sum to 1), so
  the ``[N, C/2]`` key and value maps are never built;
* image->token attention: the query projection is folded into the keys
  (``(W_q x + b_q) . k = x . (W_q^T k) + b_q . k``), and the output projection into
  the values (``sum_h P_h V_h W_o,h^T = [P_1..P_h] @ [V_1 W_o,1^T; ..]``);
* the two transposed convolutions (kernel 2, stride 2) are the linear maps they are
  (per pixel, ``C_in -> 4 C_out``) in a channels-last "sub-pixel" layout, the
  LayerNorm2d a channels-last ``layer_norm``, and only the best of the three masks
  is formed.

These are exact identities; in floating point the results differ from the sam2
modules' only by rounding (checked in ``tests/test_fast_mode.py``). The object-score
head and the single-mask output (token 0) are not computed: the proposals do not use
them. Under bf16 autocast the dense positional encoding and the small token-side heads
(IoU head, hypernetwork MLPs) run in fp32 (so does the prompt encoder in
``SAM2ProposalGenerator``), and the outputs are fp32.

FLOPs (matrix products, SAM2 decoder at 1024 px, torch's FlopCounterMode): the sam2
modules take 3.64 GFLOP per prompt; here ``prepare`` takes 0.81 GFLOP per image and
``decode`` 1.83 GFLOP per prompt (1024 prompts: 3.73 -> 1.87 TFLOP per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ImageContext:
    """Prompt-independent tensors of one image (see :meth:`FastMaskDecoder.prepare`)."""

    src: Tensor  # [N, C] image embedding + no-mask embedding, N = h * w
    pe: Tensor  # [N, C] dense positional encoding (fp32)
    t2i_k: Tensor  # [heads, N, d] first block, token->image keys
    t2i_v: Tensor  # [heads, N, d] first block, token->image values
    i2t_q: Tensor  # [heads, N, d] first block, image->token queries, pre-scaled by 1/sqrt(d)
    feat_s1: Tensor | None  # [h, w, 2, 2, C/4] high-res features, sub-pixel layout
    feat_s0: Tensor | None  # [h, w, 2, 2, 2, 2, C/8]
    size: tuple[int, int]  # (h, w) of the image embedding


def _fp32(device: torch.device):
    """Autocast off (the enclosed code runs in fp32 when its inputs are fp32)."""
    return torch.autocast(device_type=device.type, enabled=False)


class FastMaskDecoder:
    """Best-of-multimask decoding of many prompts per image; see the module docstring.

    >>> dec = FastMaskDecoder(model.sam_mask_decoder, model.sam_prompt_encoder)
    >>> ctx = dec.prepare(embed, [feat_s0, feat_s1])     # once per image, batch 1
    >>> logits, iou = dec.decode(ctx, sparse)             # per prompt batch
    """

    def __init__(self, mask_decoder, prompt_encoder):
        from sam2.modeling.sam.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

        t = mask_decoder.transformer
        if type(t) is not TwoWayTransformer or len(t.layers) < 1:
            raise TypeError(f"FastMaskDecoder needs sam2's TwoWayTransformer, got {type(t).__name__}")
        attentions = [t.final_attn_token_to_image]
        for i, layer in enumerate(t.layers):
            if type(layer) is not TwoWayAttentionBlock or layer.skip_first_layer_pe != (i == 0):
                raise TypeError("FastMaskDecoder needs TwoWayAttentionBlocks with the PE skipped in the first only")
            attentions += [layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
        for attn in attentions:
            if type(attn) is not Attention or attn.kv_in_dim != attn.embedding_dim:
                raise TypeError(f"FastMaskDecoder needs plain sam2 Attention layers, got {attn}")
        if mask_decoder.num_multimask_outputs < 1:
            raise ValueError("FastMaskDecoder needs a decoder with multimask outputs")
        self.dec = mask_decoder
        self.pe_layer = prompt_encoder.pe_layer
        self.no_mask_embed = prompt_encoder.no_mask_embed
        self.embedding_size = tuple(prompt_encoder.image_embedding_size)
        self.s = 1 if mask_decoder.pred_obj_scores else 0  # index of the IoU token

    # ------------------------------------------------------------------ per image

    def dense_pe(self, device: torch.device) -> Tensor:
        """``get_dense_pe()`` in fp32, ``[N, C]``."""
        with _fp32(device):
            return self.pe_layer(self.embedding_size).flatten(1).T.contiguous().float()

    def prepare(self, image_embedding: Tensor, high_res_features: list[Tensor] | None = None) -> ImageContext:
        """Prompt-independent work for one image: ``image_embedding`` ``[1, C, h, w]``,
        ``high_res_features`` ``[feat_s0 [1, C/8, 4h, 4w], feat_s1 [1, C/4, 2h, 2w]]`` (already
        passed through ``conv_s0``/``conv_s1``, as ``SAM2Base.forward_image`` returns them)."""
        if image_embedding.ndim != 4 or image_embedding.shape[0] != 1:
            raise ValueError(f"expected one image embedding [1, C, h, w], got {tuple(image_embedding.shape)}")
        _, c, h, w = image_embedding.shape
        if (h, w) != self.embedding_size:
            raise ValueError(f"image embedding is {h}x{w}, the prompt encoder expects {self.embedding_size}")
        device = image_embedding.device
        src = image_embedding[0].flatten(1).T + self.no_mask_embed.weight  # [N, C]
        pe = self.dense_pe(device)
        first = self.dec.transformer.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        src_pe = src + pe
        heads = t2i.num_heads
        t2i_k = _split_heads(t2i.k_proj(src_pe), heads)
        t2i_v = _split_heads(t2i.v_proj(src), heads)
        heads_i = i2t.num_heads
        i2t_q = _split_heads(i2t.q_proj(src_pe), heads_i) * (1.0 / math.sqrt(i2t.internal_dim // heads_i))
        feat_s0 = feat_s1 = None
        if self.dec.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this SAM2 decoder uses high-resolution features: pass [feat_s0, feat_s1]")
            f0, f1 = high_res_features
            c1, c0 = f1.shape[1], f0.shape[1]
            # pixel (2i + a, 2j + b) -> [i, j, a, b, :]; pixel (4i + 2a + a2, 4j + 2b + b2) -> [i, j, a, b, a2, b2, :]
            feat_s1 = f1[0].reshape(c1, h, 2, w, 2).permute(1, 3, 2, 4, 0).contiguous()
            feat_s0 = f0[0].reshape(c0, h, 2, 2, w, 2, 2).permute(1, 4, 2, 5, 3, 6, 0).contiguous()
        return ImageContext(src, pe, t2i_k, t2i_v, i2t_q, feat_s1, feat_s0, (h, w))

    # ------------------------------------------------------------------ per prompt batch

    def decode(self, ctx: ImageContext, sparse: Tensor) -> tuple[Tensor, Tensor]:
        """Best-of-three multimask logits ``[n, 4h, 4w]`` and predicted IoU ``[n]`` (both fp32).

        ``sparse`` ``[n, k, C]``: the prompt encoder's sparse embeddings of ``n`` prompts.
        """
        dec = self.dec
        tr = dec.transformer
        n = sparse.shape[0]
        device = sparse.device
        output_tokens = [dec.iou_token.weight, dec.mask_tokens.weight]
        if dec.pred_obj_scores:
            output_tokens.insert(0, dec.obj_score_token.weight)
        out_tok = torch.cat(output_tokens, dim=0)
        tokens = torch.cat([out_tok.unsqueeze(0).expand(n, -1, -1).to(sparse.dtype), sparse], dim=1)  # [n, T, C]

        # ---- first block: the image side is still src (prompt-independent)
        first = tr.layers[0]
        queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
        attn = first.cross_attn_token_to_image
        queries = first.norm2(queries + self._t2i_shared(attn, queries + tokens, ctx))
        queries = first.norm3(queries + first.mlp(queries))
        attn = first.cross_attn_image_to_token
        keys = first.norm4(_add(self._i2t(attn, ctx.i2t_q, None, queries + tokens, queries), ctx.src))  # [n, N, C]

        # ---- further blocks: everything per prompt
        for layer in tr.layers[1:]:
            q = queries + tokens
            queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            keys_pe = keys + ctx.pe
            queries = layer.norm2(queries + self._t2i(layer.cross_attn_token_to_image, queries + tokens,
                                                      keys_pe, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            attn_out = self._i2t(layer.cross_attn_image_to_token, None, keys_pe, queries + tokens, queries)
            del keys_pe
            keys = layer.norm4(_add(attn_out, keys))

        queries = tr.norm_final_attn(queries + self._t2i(tr.final_attn_token_to_image, queries + tokens,
                                                         keys + ctx.pe, keys))

        # ---- heads (token side, tiny: fp32)
        s, m = self.s, dec.num_multimask_outputs
        with _fp32(device):
            hs = queries.float()
            iou = dec.iou_prediction_head(hs[:, s])[:, 1 : 1 + m]  # multimask outputs: mask tokens 1..m
            best = iou.argmax(dim=1)  # [n]
            rows = torch.arange(n, device=device)
            best_iou = iou[rows, best]
            hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, s + 1 + i]) for i in range(1, 1 + m)],
                                dim=1)[rows, best]  # [n, C/8]

        # ---- upscaling and the best mask
        h, w = ctx.size
        up = self._upscale(keys, ctx)  # [n, h, w, 2, 2, 2, 2, C/8]
        c8 = up.shape[-1]
        logits = torch.bmm(up.reshape(n, -1, c8), hyper.to(up.dtype).unsqueeze(-1))  # [n, 16N, 1]
        logits = logits.view(n, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 4 * h, 4 * w)
        return logits.float(), best_iou.float()

    # ------------------------------------------------------------------ pieces

    @staticmethod
    def _t2i_shared(attn, q_in: Tensor, ctx: ImageContext) -> Tensor:
        """Token->image attention of the first block: keys/values are the image's, shared by all prompts.

        All ``n * T`` queries attend to the same ``N`` keys: one attention call, no per-prompt copies.
        """
        n, t, _ = q_in.shape
        heads = attn.num_heads
        q = attn.q_proj(q_in)  # [n, T, Ci]
        d = q.shape[-1] // heads
        q = q.view(n * t, heads, d).transpose(0, 1).unsqueeze(0)  # [1, heads, n*T, d]
        k, v = ctx.t2i_k.unsqueeze(0).to(q.dtype), ctx.t2i_v.unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v)  # [1, heads, n*T, d]
        out = out[0].transpose(0, 1).reshape(n, t, heads * d)
        return attn.out_proj(out)

    @staticmethod
    def _t2i(attn, q_in: Tensor, k_in: Tensor, v_in: Tensor) -> Tensor:
        """``attn(q=q_in, k=k_in, v=v_in)`` for T token queries and N per-prompt image keys, with the
        key projection folded into the queries and the value projection applied after pooling.

        q_in ``[n, T, C]``, k_in / v_in ``[n, N, C]`` -> ``[n, T, C]``.
        """
        n, t, c = q_in.shape
        heads = attn.num_heads
        ci = attn.internal_dim
        d = ci // heads
        q = attn.q_proj(q_in).view(n, t, heads, d)
        # score(t, p) = q_t . (W_k x_p + b_k) = (W_k^T q_t) . x_p + q_t . b_k; the last term is the same
        # for every key p and cancels in the softmax
        qk = torch.einsum("nthd,hdc->nhtc", q, attn.k_proj.weight.view(heads, d, c)).reshape(n, heads * t, c)
        scores = torch.bmm(qk * (1.0 / math.sqrt(d)), k_in.transpose(1, 2))  # [n, h*T, N]
        probs = scores.softmax(dim=-1)
        pooled = torch.bmm(probs, v_in)  # [n, h*T, C]
        # head h: sum_p P(t, p) (W_v,h x_p + b_v,h) = W_v,h pooled_h + b_v,h (rows of P sum to 1)
        out = torch.einsum("nhtc,hdc->nthd", pooled.view(n, heads, t, c), attn.v_proj.weight.view(heads, d, c))
        return attn.out_proj(out.reshape(n, t, ci) + attn.v_proj.bias)

    @staticmethod
    def _i2t(attn, q_pre: Tensor | None, x: Tensor | None, k_in: Tensor, v_in: Tensor) -> Tensor:
        """``attn(q=x, k=k_in, v=v_in)`` for N image queries and T token keys/values.

        Either ``q_pre`` (``[heads, N, d]``, projected and scaled, shared by all prompts: the first block)
        or ``x`` (``[n, N, C]``, per prompt; the query projection is folded into the keys) is given. The
        output projection is folded into the values. k_in, v_in ``[n, T, C]`` -> ``[n, N, C]``.
        """
        n, t, c = k_in.shape
        heads = attn.num_heads
        d = attn.internal_dim // heads
        k = attn.k_proj(k_in).view(n, t, heads, d)
        v = attn.v_proj(v_in).view(n, t, heads, d)
        if q_pre is not None:
            # scores[h, p, (n, t)] = q_h,p . k_n,h,t: one matmul per head for all prompts
            kk = k.permute(2, 3, 0, 1).reshape(heads, d, n * t)
            scores = torch.matmul(q_pre.to(kk.dtype), kk)  # [h, N, n*T]
            npix = scores.shape[1]
            probs = scores.view(heads, npix, n, t).softmax(dim=-1)
            probs = probs.permute(2, 1, 0, 3).reshape(n, npix, heads * t)  # [n, N, h*T]
        else:
            # (W_q x + b_q) . k = x . (W_q^T k) + b_q . k
            scale = 1.0 / math.sqrt(d)
            kq = torch.einsum("nthd,hdc->nhtc", k * scale, attn.q_proj.weight.view(heads, d, c))
            bias = torch.einsum("nthd,hd->nht", k * scale, attn.q_proj.bias.view(heads, d))
            scores = torch.baddbmm(bias.reshape(n, 1, heads * t), x, kq.reshape(n, heads * t, c).transpose(1, 2))
            npix = scores.shape[1]
            probs = scores.view(n, npix, heads, t).softmax(dim=-1).view(n, npix, heads * t)  # [n, N, h*T]
        # out = sum_h P_h V_h W_o,h^T + b_o
        wo = attn.out_proj.weight.view(c, heads, d)
        vo = torch.einsum("nthd,chd->nhtc", v, wo).reshape(n, heads * t, c)
        return torch.baddbmm(attn.out_proj.bias, probs, vo)

    def _upscale(self, keys: Tensor, ctx: ImageContext) -> Tensor:
        """``output_upscaling`` (with the high-res features added) on ``keys`` ``[n, N, C]``, channels-last:
        ``[n, h, w, 2, 2, 2, 2, C/8]``, element ``[., i, j, a, b, a2, b2, :]`` is pixel (4i+2a+a2, 4j+2b+b2)."""
        dc1, ln1, act1, dc2, act2 = self.dec.output_upscaling
        n = keys.shape[0]
        h, w = ctx.size
        y = _conv_transpose_2x2(dc1, keys)  # [n, N, 4 * C1] (a, b, c)
        c1 = y.shape[-1] // 4
        y = y.view(n, h, w, 2, 2, c1)
        if ctx.feat_s1 is not None:
            y = _add(y, ctx.feat_s1)
        y = _act_(act1, F.layer_norm(y, (c1,), ln1.weight, ln1.bias, ln1.eps))
        y = _conv_transpose_2x2(dc2, y)  # [n, h, w, 2, 2, 4 * C0]
        c0 = y.shape[-1] // 4
        y = y.view(n, h, w, 2, 2, 2, 2, c0)
        if ctx.feat_s0 is not None:
            y = _add(y, ctx.feat_s0)
        return _act_(act2, y)


def _add(x: Tensor, y: Tensor) -> Tensor:
    """``x + y``, in place in ``x`` (a fresh intermediate) when that gives the same result dtype and shape."""
    if torch.promote_types(x.dtype, y.dtype) == x.dtype and torch.broadcast_shapes(x.shape, y.shape) == x.shape:
        return x.add_(y)
    return x + y


def _act_(act, x: Tensor) -> Tensor:
    """``act(x)``, in place for GELU and ReLU (the intermediates here are large; fewer allocations)."""
    if type(act) is torch.nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if type(act) is torch.nn.ReLU:
        return x.relu_()
    return act(x)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[N, heads * d] -> [heads, N, d] (contiguous)."""
    n, c = x.shape
    return x.view(n, heads, c // heads).transpose(0, 1).contiguous()


def _conv_transpose_2x2(conv, x: Tensor) -> Tensor:
    """A ConvTranspose2d with kernel 2 and stride 2 on channels-last ``x`` ``[..., C_in]``:
    ``[..., 4 * C_out]`` ordered (a, b, c_out), where (a, b) is the output sub-pixel."""
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (0, 0) \
            or conv.groups != 1 or tuple(conv.dilation) != (1, 1) or tuple(conv.output_padding) != (0, 0):
        raise TypeError(f"expected a 2x2 stride-2 ConvTranspose2d, got {conv}")
    weight = conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.weight.shape[0])  # [(a, b, c_out), c_in]
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    return F.linear(x, weight, bias)
