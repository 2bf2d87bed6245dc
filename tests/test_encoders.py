"""DINOv3 and C-RADIO encoders on random-weight networks, on the CPU, offline.

Checkpoints are written by the tests from random networks in each source's layout
(Meta's DINOv3 repository, timm's, NVIDIA's C-RADIO files) and loaded through the
real path (local file and cache); the features must be those of the network the file
was written from, and for Meta's layout those of a plain-torch forward of DINOv3.

Tolerances: features are O(1) (after LayerNorm; C-RADIO's unnormalised tokens are
O(10)). Loading into the same timm network repeats the same float32 operations, so
the match is exact up to a few ulps (atol 1e-5 covers ~100 ulps at 1). The plain
forward is computed in float64 with other operation orders (manual attention vs
SDPA); float32 rounding through 12 blocks stays below 1e-4 relative.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refseg import PAPER, BankMismatchError, MemoryBank, Segmenter
from refseg.method.interfaces import FeatureEncoder
from refseg.models import TIMM_VARIANTS, TimmEncoder, build_encoder, build_proposer, encoder_names, timm_variant
from refseg.models.checkpoints import CheckpointError, sidecar_path
from refseg.models.registry import is_registered_encoder
from refseg.models.timm_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    build_timm_network,
    convert_meta_dinov3,
    dinov3_rope_periods,
)

SIZE = 64  # input side: a 4 x 4 patch grid
DINOV3, RADIO = "vit_small_patch16_dinov3", "vit_base_patch16_radio_v3"  # the smallest of each family
QKVB, TINY_QKVB = "vit_small_patch16_dinov3_qkvb", "vit_tiny_patch16_dinov3_qkvb"  # timm's twins with qkv biases


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("REFSEG_CACHE_DIR", raising=False)
    monkeypatch.delenv("REFSEG_OFFLINE", raising=False)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from timm's init (layer scale 1e-5 would hide most of each block): O(1) features."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "gamma" in name:
                p.copy_(0.3 + 0.1 * r)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            elif p.ndim >= 2 and "token" not in name and "pos_embed" not in name:
                p.copy_(r * p[0].numel() ** -0.5)
            else:
                p.copy_((1.0 if "token" in name or "pos_embed" in name else 0.1) * r)
    return model.eval()


def images(n=2, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def own_forward(model, x, mean, std):
    """The random network's own dense output: normalise, forward_features, drop the prefix tokens."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model.forward_features((x - m) / s)
    g = SIZE // 16
    return tokens[:, model.num_prefix_tokens:].reshape(x.shape[0], g, g, -1)


# ============================================================================ registry


def test_registry_matches_timm():
    import timm

    expected_dinov3 = {f"vit_{s}_patch16_dinov3" for s in ("small", "small_plus", "base", "large", "huge_plus", "7b")}
    expected_radio = {f"vit_{s}_patch16_radio_v3" for s in ("base", "large", "huge", "giant")} | {
        "vit_so400m_patch16_radio_v4", "vit_huge_patch16_radio_v4"}
    expected_qkvb = set(timm.list_models("*_dinov3_qkvb"))  # every one timm has
    assert expected_qkvb >= {f"{n}_qkvb" for n in expected_dinov3 - {"vit_7b_patch16_dinov3"}}
    assert set(TIMM_VARIANTS) == expected_dinov3 | expected_qkvb | expected_radio
    for name, v in TIMM_VARIANTS.items():
        assert timm.is_model(name)
        tag = ("c_radio" if v.family == "c-radio" else "eupe_lvd1689m" if name == "vit_tiny_patch16_dinov3_qkvb"
               else "lvd1689m")
        cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}")
        assert tuple(cfg.mean) == pytest.approx(v.mean) and tuple(cfg.std) == pytest.approx(v.std)
        assert v.input_size % 16 == 0
        assert v.checkpoint.url == f"https://huggingface.co/timm/{name}.{tag}/resolve/main/model.safetensors"
        assert all(s.spec.sha256 is None for s in v.sources)  # no official hash is known: trust on first use
    assert timm_variant("dinov3_vits16plus").name == "vit_small_plus_patch16_dinov3"  # Meta's stem: the plain one
    plain, twin = TIMM_VARIANTS["vit_base_patch16_dinov3"], TIMM_VARIANTS["vit_base_patch16_dinov3_qkvb"]
    assert (twin.dim, twin.input_size, twin.mean, twin.std, twin.features) == (
        plain.dim, plain.input_size, plain.mean, plain.std, plain.features)
    assert twin.sources[1:] == plain.sources[1:] and not twin.aliases  # the same Meta file
    assert TIMM_VARIANTS[RADIO].mean == CLIP_MEAN
    assert set(encoder_names()) >= set(TIMM_VARIANTS) | {"dinov2_vitl14"}
    assert is_registered_encoder("dinov3_vits16") and is_registered_encoder("dinov2_vits14_reg4")
    assert not is_registered_encoder("clip")
    with pytest.raises(KeyError, match="unknown DINOv3 / C-RADIO model"):
        timm_variant("dinov2_vits14")


def test_plugin_lists_the_new_encoders():
    from fiftyone_plugin import ENCODER_CHOICES

    assert ENCODER_CHOICES[0] == "dinov2_vitl14" and set(TIMM_VARIANTS) <= set(ENCODER_CHOICES)


def test_models_command_lists_them(tmp_path, capsys):
    from refseg.cli import main

    (tmp_path / "dinov3_vits16_pretrain_lvd1689m-0123abcd.pth").write_bytes(b"x")  # Meta's hashed name
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    lines = {line.split()[1]: line for line in (out.out + out.err).splitlines() if line.startswith("  encoder")}
    assert "present" in lines[DINOV3] and "(Meta (licence form))" in lines[DINOV3]
    assert "missing" in lines[RADIO] and "timm/vit_base_patch16_radio_v3.c_radio" in lines[RADIO]
    assert "present" in lines[QKVB] and "timm/vit_tiny_patch16_dinov3_qkvb.eupe_lvd1689m" in lines[TINY_QKVB]


# ============================================================================ DINOv3: Meta's layout


def to_meta_layout(model) -> dict[str, torch.Tensor]:
    """The state dict of a timm DINOv3 network in the layout of Meta's DINOv3 repository."""
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    sd = {"mask_token": torch.zeros(1, dim), "rope_embed.periods": dinov3_rope_periods(dim // heads)}
    swiglu = hasattr(model.blocks[0].mlp, "fc1_g")
    for k, v in model.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if swiglu:
            k = k.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.").replace(".mlp.fc2.", ".mlp.w3.")
        sd[k] = v.clone()
    for i in range(len(model.blocks)):  # DINOv3's LinearKMaskedBias: a bias and a mask zeroing the key part
        q, v = (sd.pop(f"blocks.{i}.attn.{part}_bias", torch.zeros(dim)) for part in ("q", "v"))  # a _qkvb twin's
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.full((dim,), 0.5), v])  # the key part is masked out
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    return sd


def reference_dinov3(sd, x, heads):
    """Plain forward of DINOv3's ViT (float64) from a Meta-layout state dict: cls + storage tokens, RoPE on
    patch tokens with coordinates in [-1, 1] at patch centres, LayerScale, final LayerNorm (eps 1e-5)."""
    sd = {k: v.double() for k, v in sd.items()}
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    x = (x.double() - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    b = x.shape[0]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    dim, g = x.shape[1], x.shape[-1]
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), sd["storage_tokens"].expand(b, -1, -1),
                   x.flatten(2).transpose(1, 2)], dim=1)
    prefix, n, hd = 1 + sd["storage_tokens"].shape[1], x.shape[1], dim // heads
    c = (torch.arange(0.5, g, dtype=torch.float64) / g) * 2 - 1
    coords = torch.stack(torch.meshgrid(c, c, indexing="ij"), dim=-1).flatten(0, 1)  # [g*g, 2] (y, x)
    angles = (2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"][None, None]).flatten(1).tile(2)
    sin, cos = angles.sin(), angles.cos()

    def rope(t):
        p, t = t[:, :, :prefix], t[:, :, prefix:]
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([p, t * cos + torch.cat([-t2, t1], dim=-1) * sin], dim=2)

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-5)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] * sd[p + "attn.qkv.bias_mask"])
        q, k, v = qkv.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((rope(q) @ rope(k).transpose(-2, -1)) * hd ** -0.5).softmax(dim=-1)
        h = F.linear((attn @ v).transpose(1, 2).reshape(b, n, dim), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + sd[p + "ls1.gamma"] * h
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-5)
        if p + "mlp.w1.weight" in sd:  # SwiGLU (S+, H+, 7B)
            h = F.silu(F.linear(h, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"])) * F.linear(
                h, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"])
            h = F.linear(h, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:
            h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2.gamma"] * h
    x = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-5)
    return x[:, prefix:].reshape(b, g, g, dim).float()


@pytest.fixture(scope="module")
def dinov3_net():
    return randomise(build_timm_network(TIMM_VARIANTS[DINOV3], SIZE), seed=1)


@pytest.fixture(scope="module")
def meta_file(dinov3_net, tmp_path_factory):
    sd = to_meta_layout(dinov3_net)
    path = tmp_path_factory.mktemp("meta") / "dinov3_vits16_pretrain_lvd1689m-0123abcd.pth"
    torch.save(sd, path)
    return sd, path


def test_dinov3_meta_checkpoint_local_and_cache(dinov3_net, meta_file, tmp_path):
    sd, path = meta_file
    x = images()
    enc = TimmEncoder.from_name(DINOV3, checkpoint=path, device="cpu", input_size=SIZE)
    assert isinstance(enc, FeatureEncoder)
    assert (enc.name, enc.input_size, enc.patch_size, enc.dim) == (DINOV3, SIZE, 16, 384)
    feats = enc.encode(x)
    assert feats.shape == (2, SIZE // 16, SIZE // 16, 384) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, own_forward(dinov3_net, x, enc.mean, enc.std), atol=1e-5, rtol=1e-5)
    assert feats.abs().max() > 0.5  # O(1) features: the tolerances above are meaningful
    torch.testing.assert_close(feats, reference_dinov3(sd, x, heads=6), atol=1e-4, rtol=1e-4)

    shutil.copy(path, tmp_path / path.name)  # Meta's own file name in the cache, found offline
    cached = TimmEncoder.from_name("dinov3_vits16", device="cpu", input_size=SIZE, cache_dir=tmp_path, offline=True)
    assert sidecar_path(tmp_path / path.name).is_file()  # no official hash: recorded on first use
    torch.testing.assert_close(cached.encode(x), feats, atol=0, rtol=0)
    assert cached.settings() == enc.settings()


def test_dinov3_swiglu_meta_layout_converts():
    """S+'s SwiGLU (w1 gate, w2 value, w3 out) on a one-block network."""
    variant = TIMM_VARIANTS["vit_small_plus_patch16_dinov3"]
    net = randomise(build_timm_network(variant, SIZE, depth=1), seed=2)
    sd = to_meta_layout(net)
    assert "blocks.0.mlp.w1.weight" in sd and "blocks.0.mlp.w3.weight" in sd
    fresh = build_timm_network(variant, SIZE, depth=1)
    fresh.load_state_dict(convert_meta_dinov3(sd, fresh), strict=True)
    x = images(1, seed=5)
    feats = own_forward(fresh.eval(), x, variant.mean, variant.std)
    torch.testing.assert_close(feats, own_forward(net, x, variant.mean, variant.std), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, reference_dinov3(sd, x, heads=6), atol=1e-4, rtol=1e-4)


def test_dinov3_qkvb_twin_builds_and_takes_meta_biases(tmp_path):
    """The _qkvb twin: random weights give the plain variant's feature grid; a Meta-layout file with non-zero
    query / value biases (and a masked key bias, and the projector heads of Meta's EUPE files) loads strictly
    and gives the features of the network it was written from, and of DINOv3's own forward."""
    x = images(1, seed=3)
    enc = TimmEncoder.from_name(QKVB, device="cpu", input_size=SIZE, random_init=True)
    assert enc.encode(x).shape == (1, SIZE // 16, SIZE // 16, 384) and enc.settings()["timm_arch"] == QKVB

    variant = TIMM_VARIANTS[TINY_QKVB]
    net = randomise(build_timm_network(variant, SIZE, depth=2), seed=4)  # randomise makes the biases non-zero
    sd = to_meta_layout(net)
    assert sd["blocks.0.attn.qkv.bias"][:192].abs().min() > 0
    sd["projectors.0.weight"] = torch.ones(8, 192)
    fresh = build_timm_network(variant, SIZE, depth=2)
    fresh.load_state_dict(convert_meta_dinov3(sd, fresh), strict=True)
    feats = own_forward(fresh.eval(), x, variant.mean, variant.std)
    torch.testing.assert_close(feats, own_forward(net, x, variant.mean, variant.std), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, reference_dinov3(sd, x, heads=3), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, message", [
    ("qkv_bias", r"qkv\.bias is not zero .* use the '_qkvb' timm architecture"),
    ("periods", r"rope_embed\.periods .* differ from DINOv3's base-100 periods"),
    ("missing", r"1 missing key\(s\): blocks\.3\.gamma_2"),
    ("radio_layout", r"is a nvidia-radio checkpoint, not one of vit_small_patch16_dinov3"),
])
def test_dinov3_bad_checkpoints(meta_file, tmp_path, kind, message):
    sd = dict(meta_file[0])
    if kind == "qkv_bias":
        sd["blocks.0.attn.qkv.bias"] = torch.ones(3 * 384)
    elif kind == "periods":
        sd["rope_embed.periods"] = sd["rope_embed.periods"] * 2
    elif kind == "missing":
        del sd["blocks.3.ls2.gamma"]
    else:
        sd = {"radio_model.model.blocks.0.norm1.weight": torch.ones(384)}
    path = tmp_path / f"{kind}.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=message) as info:
        TimmEncoder.from_name(DINOV3, checkpoint=path, input_size=SIZE)
    assert str(path) in str(info.value)


# ============================================================================ timm's layout


def test_dinov3_timm_safetensors_from_cache(dinov3_net, tmp_path):
    from safetensors.torch import save_file

    variant = TIMM_VARIANTS[DINOV3]
    save_file(dinov3_net.state_dict(), str(tmp_path / variant.checkpoint.filename))
    enc = build_encoder(DINOV3, device="cpu", input_size=SIZE, cache_dir=tmp_path, offline=True)
    x = images(seed=3)
    torch.testing.assert_close(enc.encode(x), own_forward(dinov3_net, x, variant.mean, variant.std),
                               atol=1e-5, rtol=1e-5)
    (tmp_path / variant.checkpoint.filename).write_bytes(b"cut short")
    sidecar_path(tmp_path / variant.checkpoint.filename).unlink()
    with pytest.raises(CheckpointError, match="cannot read dinov3"):
        build_encoder(DINOV3, device="cpu", input_size=SIZE, cache_dir=tmp_path, offline=True)


def test_offline_without_file_names_every_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)vit_small_patch16_dinov3\.lvd1689m\.safetensors.*"
                                                r"Meta \(licence form\).*dinov3_vits16_pretrain_lvd1689m\.pth"):
        build_encoder(DINOV3, cache_dir=tmp_path, offline=True)
    with pytest.raises(FileNotFoundError, match=r"(?s)c_radio.*nvidia/C-RADIOv3-B/resolve/main/model\.safetensors"):
        build_encoder(RADIO, cache_dir=tmp_path, offline=True)


# ============================================================================ C-RADIO: NVIDIA's layout


@pytest.fixture(scope="module")
def radio_files(tmp_path_factory):
    """A random C-RADIOv3-B at SIZE px and NVIDIA's layout of it, with a 16 x 16 position grid."""
    variant = TIMM_VARIANTS[RADIO]
    net = randomise(build_timm_network(variant, SIZE), seed=4)
    gen = torch.Generator().manual_seed(9)
    grid16 = torch.randn(1, 16 * 16, 768, generator=gen)
    with torch.no_grad():
        net.patch_embed.proj.bias.zero_()  # RADIO's patch embedder has no bias
        g = SIZE // 16  # RADIO resizes its grid (bilinear, align_corners=True for v3-B) to the input's
        pos = F.interpolate(grid16.reshape(1, 16, 16, 768).permute(0, 3, 1, 2), size=(g, g), mode="bilinear",
                            align_corners=True)
        net.pos_embed.copy_(pos.permute(0, 2, 3, 1).reshape(1, g * g, 768))
    p = "radio_model.model."
    sd = {p + k: v.clone() for k, v in net.state_dict().items()
          if k not in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "reg_token", "pos_embed")}
    sd[p + "patch_generator.embedder.weight"] = net.patch_embed.proj.weight.detach().reshape(768, -1).clone()
    sd[p + "patch_generator.pos_embed"] = grid16
    sd[p + "patch_generator.cls_token.token"] = torch.cat([net.cls_token, net.reg_token], dim=1)[0].detach().clone()
    sd["radio_model.input_conditioner.norm_mean"] = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    sd["radio_model.input_conditioner.norm_std"] = torch.tensor(CLIP_STD).view(3, 1, 1)
    sd["radio_model.summary_idxs"] = torch.tensor([0, 1, 2])
    sd["radio_model.adaptors.clip.head.weight"] = torch.zeros(4, 768)
    root = tmp_path_factory.mktemp("radio")
    return net, sd, root


def test_radio_nvidia_file_local_and_cache(radio_files):
    from safetensors.torch import save_file

    net, sd, root = radio_files
    path = root / "C-RADIOv3-B.safetensors"  # the cache name of NVIDIA's file
    save_file(sd, str(path))
    x = images(seed=6)
    expected = own_forward(net, x, CLIP_MEAN, CLIP_STD)
    for enc in (TimmEncoder.from_name(RADIO, checkpoint=path, device="cpu", input_size=SIZE),
                build_encoder(RADIO, device="cpu", input_size=SIZE, cache_dir=root, offline=True)):
        feats = enc.encode(x)
        assert feats.shape == (2, SIZE // 16, SIZE // 16, 768)
        assert enc.settings()["prefix_tokens"] == 8 and enc.settings()["encoder"] == "c-radio"
        # unnormalised tokens of O(10): atol scaled accordingly
        assert 1 < feats.abs().max() < 1e3
        torch.testing.assert_close(feats, expected, atol=1e-4, rtol=1e-5)


def test_radio_wrong_conditioner_refused(radio_files, tmp_path):
    _, sd, _ = radio_files
    sd = dict(sd, **{"radio_model.input_conditioner.norm_mean": torch.full((3, 1, 1), 0.5)})
    path = tmp_path / "radio.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="input conditioner norm_mean .* is not"):
        TimmEncoder.from_name(RADIO, checkpoint=path, input_size=SIZE)


# ============================================================================ banks and the pipeline


def test_bank_refuses_another_encoder(meta_file):
    _, path = meta_file
    dinov3 = TimmEncoder.from_name(DINOV3, checkpoint=path, input_size=SIZE)
    bank = MemoryBank(dinov3.settings())
    bank.check_encoder(TimmEncoder.from_name(DINOV3, checkpoint=path, input_size=SIZE).settings())  # same: accepted
    others = [
        TimmEncoder.from_name(DINOV3, input_size=SIZE, random_init=True),  # other weights
        TimmEncoder.from_name(DINOV3, checkpoint=path, input_size=2 * SIZE),  # other input size
        build_encoder("dinov2_vits14", input_size=56, random_init=True),  # other family, same dim
    ]
    for other in others:
        with pytest.raises(BankMismatchError, match="rebuild the bank"):
            bank.check_encoder(other.settings())


@pytest.mark.slow
def test_segmenter_runs_with_dinov3_and_radio():
    cfg = PAPER.with_overrides(**{"proposal.image_size": 256, "proposal.points_per_side": 4,
                                  "proposal.pred_iou_threshold": -1.0})
    torch.manual_seed(0)
    proposer = build_proposer("sam2.1_hiera_t", device="cpu", config=cfg.proposal, random_init=True)
    blocks = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)  # 48 x 64, some structure for SAM2
    for name in (DINOV3, RADIO):
        encoder = build_encoder(name, device="cpu", input_size=SIZE, random_init=True)
        bank = MemoryBank(encoder.settings())
        gen = torch.Generator().manual_seed(1)
        for cls in ("a", "b"):
            bank.add(cls, torch.randn(encoder.dim, generator=gen))
        seg = Segmenter(proposer, encoder, bank, cfg)
        (cand,) = seg.propose([image])
        assert 0 < len(cand) <= 16 and cand.features.shape == (len(cand), encoder.dim)
        torch.testing.assert_close(cand.features.norm(dim=1), torch.ones(len(cand)), atol=1e-4, rtol=0)
        dets = seg.label(cand)
        assert dets.masks.shape[1:] == (48, 64) and dets.masks.dtype == bool
        assert set(dets.labels.tolist()) <= {0, 1}
        assert np.all((dets.scores > 0) & (dets.scores <= 1 + 1e-6))
