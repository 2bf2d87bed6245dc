"""The model layer on real (randomly initialised) SAM2 and DINOv2 networks, on the CPU.

Checkpoints are written by the tests in the official layouts; nothing is downloaded
(the download path runs on ``file://`` URLs).
"""

from __future__ import annotations

import importlib.resources
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refseg.method.config import ProposalConfig
from refseg.models.devices import select_device
from refseg.method.interfaces import FeatureEncoder, ProposalGenerator, Proposals
from refseg.models import (
    DINOV2_VARIANTS,
    SAM2_VARIANTS,
    DINOv2Encoder,
    SAM2ProposalGenerator,
    build_encoder,
    build_proposer,
    load_component,
    load_sam2,
    point_grid,
)
from refseg.models.checkpoints import CheckpointError, CheckpointSpec, resolve_checkpoint, sha256_file, sidecar_path
from refseg.models.dinov2_encoder import convert_official_state_dict, dinov2_variant, load_dinov2_weights

SAM_SIZE = 256  # SAM2 input side in these tests (1024 in paper mode); logits are SAM_SIZE / 4
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ============================================================================ devices


def test_select_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    assert select_device().type == expected
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")


def test_select_device_errors():
    with pytest.raises(ValueError, match="unknown device"):
        select_device("quantum")
    with pytest.raises(ValueError, match="cuda:99"):
        select_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="MPS is not available"):
            select_device("mps")


# ============================================================================ checkpoint resolution


@pytest.fixture
def source_file(tmp_path):
    src = tmp_path / "remote" / "weights.pt"
    src.parent.mkdir()
    src.write_bytes(b"pretend weights " * 1000)
    return src


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("REFSEG_CACHE_DIR", raising=False)
    monkeypatch.delenv("REFSEG_OFFLINE", raising=False)


def test_local_path_used_as_is(source_file):
    assert resolve_checkpoint(None, path=str(source_file)) == source_file
    assert not sidecar_path(source_file).exists()


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_checkpoint(None, path=missing)


def test_cache_hit_records_hash_then_verifies(tmp_path, source_file, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(source_file, cache / "model.pt")
    spec = CheckpointSpec(url="https://example.invalid/model.pt", filename="model.pt")
    monkeypatch.setenv("REFSEG_CACHE_DIR", str(cache))
    monkeypatch.setenv("REFSEG_OFFLINE", "1")  # a cache hit must not touch the network
    assert resolve_checkpoint(spec) == cache / "model.pt"
    assert sidecar_path(cache / "model.pt").read_text().split()[0] == sha256_file(source_file)
    assert resolve_checkpoint(spec) == cache / "model.pt"  # verified against the sidecar

    with open(cache / "model.pt", "ab") as fh:  # the file changes after first use
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="checksum mismatch.*delete it"):
        resolve_checkpoint(spec)


def test_offline_missing_names_file_dir_and_url(tmp_path, monkeypatch):
    spec = CheckpointSpec(url="https://dl.example.org/x/model_v2.pt", filename="model_v2.pt")
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint(spec, cache_dir=tmp_path, offline=True)
    msg = str(info.value)
    assert str(tmp_path / "model_v2.pt") in msg and str(tmp_path) in msg and spec.url in msg
    monkeypatch.setenv("REFSEG_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline"):
        resolve_checkpoint(spec, cache_dir=tmp_path)


def test_download_file_url_records_sidecar(tmp_path, source_file):
    cache = tmp_path / "cache"
    spec = CheckpointSpec(url=source_file.as_uri(), filename="model.pt")
    path = resolve_checkpoint(spec, cache_dir=cache, offline=False)
    assert path == cache / "model.pt"
    assert path.read_bytes() == source_file.read_bytes()
    assert sidecar_path(path).read_text().split() == [sha256_file(source_file), "model.pt"]
    assert sorted(p.name for p in cache.iterdir()) == ["model.pt", "model.pt.sha256"]  # no temp file left

    path.write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="delete it"):
        resolve_checkpoint(spec, cache_dir=cache, offline=False)


def test_download_verifies_known_sha256(tmp_path, source_file):
    good = CheckpointSpec(url=source_file.as_uri(), filename="a.pt", sha256=sha256_file(source_file))
    assert resolve_checkpoint(good, cache_dir=tmp_path / "c1").is_file()
    assert not sidecar_path(tmp_path / "c1" / "a.pt").exists()  # official hash known: no sidecar needed

    bad = CheckpointSpec(url=source_file.as_uri(), filename="a.pt", sha256="0" * 64)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        resolve_checkpoint(bad, cache_dir=tmp_path / "c2")
    assert list((tmp_path / "c2").iterdir()) == []  # nothing kept, no partial file


def test_download_failure_is_clear(tmp_path):
    spec = CheckpointSpec(url=(tmp_path / "absent.pt").as_uri(), filename="absent.pt")
    with pytest.raises(CheckpointError, match="could not download"):
        resolve_checkpoint(spec, cache_dir=tmp_path / "cache")


# ============================================================================ SAM2


def test_sam2_registry():
    sizes = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
    assert set(SAM2_VARIANTS) == {f"{v}_hiera_{s}" for v in ("sam2", "sam2.1") for s in sizes}
    configs = importlib.resources.files("sam2")
    for name, variant in SAM2_VARIANTS.items():
        version, size = name.split("_hiera_")
        release = "072824" if version == "sam2" else "092824"
        assert variant.config == f"configs/{version}/{name}.yaml"
        assert configs.joinpath(variant.config).is_file()
        assert variant.checkpoint.filename == f"{version}_hiera_{sizes[size]}.pt"
        assert variant.checkpoint.url == (
            f"https://dl.fbaipublicfiles.com/segment_anything_2/{release}/{variant.checkpoint.filename}")


@pytest.fixture(scope="module")
def sam2_checkpoints(tmp_path_factory):
    """name -> (randomly initialised model at SAM_SIZE, its official-layout checkpoint file)."""
    root = tmp_path_factory.mktemp("sam2")
    out = {}
    for name in ("sam2_hiera_t", "sam2.1_hiera_t"):
        model = load_sam2(name, device="cpu", image_size=SAM_SIZE, random_init=True)
        path = root / f"{name}.pt"
        torch.save({"model": model.state_dict()}, path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", ["sam2_hiera_t", "sam2.1_hiera_t"])
def test_sam2_checkpoint_roundtrip(sam2_checkpoints, name):
    original, path = sam2_checkpoints[name]
    loaded = load_sam2(name, checkpoint=path, device="cpu", image_size=SAM_SIZE)
    assert loaded.image_size == SAM_SIZE and not loaded.training
    expected = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_sam2_loads_from_cache(sam2_checkpoints, tmp_path):
    _, path = sam2_checkpoints["sam2.1_hiera_t"]
    (tmp_path / "sam2.1_hiera_tiny.pt").symlink_to(path)
    model = load_sam2("sam2.1_hiera_t", device="cpu", image_size=SAM_SIZE, cache_dir=tmp_path, offline=True)
    assert torch.equal(model.no_mem_embed, sam2_checkpoints["sam2.1_hiera_t"][0].no_mem_embed)


def _bad_sam2_checkpoint(sam2_checkpoints, tmp_path, kind):
    model, good = sam2_checkpoints["sam2.1_hiera_t"]
    sd = dict(model.state_dict())
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        del sd["sam_mask_decoder.iou_token.weight"]
        torch.save({"model": sd}, path)
    elif kind == "extra":
        sd["sam_mask_decoder.bonus.weight"] = torch.zeros(3)
        torch.save({"model": sd}, path)
    elif kind == "shape":
        sd["no_mem_embed"] = torch.zeros(1, 1, 7)
        torch.save({"model": sd}, path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: 1 << 20])
    elif kind == "no_model_key":
        torch.save(sd, path)  # a bare state dict, not {"model": ...}
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", r"1 missing key\(s\): sam_mask_decoder\.iou_token\.weight"),
    ("extra", r"1 unexpected key\(s\): sam_mask_decoder\.bonus\.weight"),
    ("shape", r"shape mismatch.*no_mem_embed: checkpoint \(1, 1, 7\) vs model \(1, 1, 256\)"),
    ("truncated", r"cannot read SAM2 checkpoint .*truncated\.pt.*truncated, corrupt"),
    ("garbage", r"cannot read SAM2 checkpoint .*garbage\.pt"),
    ("no_model_key", r"no_model_key\.pt is not a SAM2 checkpoint: expected a dict with key 'model'"),
])
def test_sam2_bad_checkpoints(sam2_checkpoints, tmp_path, kind, message):
    path = _bad_sam2_checkpoint(sam2_checkpoints, tmp_path, kind)
    with pytest.raises(CheckpointError, match=message) as info:
        load_sam2("sam2.1_hiera_t", checkpoint=path, device="cpu", image_size=SAM_SIZE)
    assert str(path) in str(info.value)


def test_sam2_argument_errors():
    with pytest.raises(KeyError, match="unknown SAM2 model 'sam3'.*sam2.1_hiera_l"):
        load_sam2("sam3", random_init=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        load_sam2("sam2.1_hiera_t", image_size=250, random_init=True)


def test_point_grid_hand_computed():
    grid = point_grid(2, 8)  # linspace(0, 7, 2) + 0.5 = [0.5, 7.5], x-major
    assert grid.dtype == torch.float32
    assert grid.tolist() == [[0.5, 0.5], [0.5, 7.5], [7.5, 0.5], [7.5, 7.5]]
    paper = point_grid(32, 1024)
    assert paper.shape == (1024, 2)
    assert paper[:3].tolist() == [[0.5, 0.5], [0.5, 33.5], [0.5, 66.5]]
    assert paper[-1].tolist() == [1023.5, 1023.5]
    third = point_grid(3, 1024)[:, 0].unique().tolist()
    assert third == [0.5, 512.0, 1023.5]
    assert point_grid(1, 64).tolist() == [[0.5, 0.5]]


@pytest.fixture(scope="module")
def sam_images():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (2, SAM_SIZE // 16, SAM_SIZE // 16, 3), dtype=np.uint8)
    u8 = np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)  # blocky images: some structure for SAM
    return u8, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0


def test_propose_shapes_filter_and_order(sam2_checkpoints, sam_images):
    model, _ = sam2_checkpoints["sam2.1_hiera_t"]
    _, images = sam_images
    cfg = ProposalConfig(image_size=SAM_SIZE, points_per_side=4, prompt_batch_size=6, pred_iou_threshold=0.0)
    gen = SAM2ProposalGenerator(model, cfg, name="sam2.1_hiera_t")
    assert isinstance(gen, ProposalGenerator)
    props = gen.propose(images)
    assert len(props) == 2
    for p in props:
        assert isinstance(p, Proposals) and len(p) == 16  # threshold 0 keeps every prompt
        assert p.logits.shape == (16, SAM_SIZE // 4, SAM_SIZE // 4) and p.logits.dtype == torch.float32
        assert p.pred_iou.shape == (16,) and p.pred_iou.dtype == torch.float32
        assert torch.isfinite(p.logits).all()
        assert ((p.pred_iou > 0) & (p.pred_iou <= 1)).all()

    # prompt batching and image batching do not change the result
    single = SAM2ProposalGenerator(model, ProposalConfig(image_size=SAM_SIZE, points_per_side=4,
                                                         prompt_batch_size=16, pred_iou_threshold=0.0))
    alone = single.propose(images[1:2])[0]
    torch.testing.assert_close(alone.pred_iou, props[1].pred_iou, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.logits, props[1].logits, atol=1e-3, rtol=1e-4)

    # the threshold keeps exactly the prompts scoring above it, in grid order
    all_iou = props[0].pred_iou
    thr = float(all_iou.median())
    strict = SAM2ProposalGenerator(model, ProposalConfig(image_size=SAM_SIZE, points_per_side=4,
                                                         prompt_batch_size=5, pred_iou_threshold=thr))
    kept = strict.propose(images[:1])[0]
    keep = all_iou > thr
    assert 0 < len(kept) == int(keep.sum()) < 16
    assert (kept.pred_iou > thr).all()
    torch.testing.assert_close(kept.pred_iou, all_iou[keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kept.logits, props[0].logits[keep], atol=1e-3, rtol=1e-4)

    nothing = SAM2ProposalGenerator(model, ProposalConfig(image_size=SAM_SIZE, points_per_side=2,
                                                          pred_iou_threshold=1.0)).propose(images[:1])[0]
    assert nothing.logits.shape == (0, SAM_SIZE // 4, SAM_SIZE // 4) and nothing.pred_iou.shape == (0,)


def test_prompts_match_official_image_predictor(sam2_checkpoints, sam_images):
    """Point and box prompts give what SAM2's own image predictor gives (it adds no_mem_embed)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model, _ = sam2_checkpoints["sam2.1_hiera_t"]
    u8, images = sam_images
    cfg = ProposalConfig(image_size=SAM_SIZE, points_per_side=3, prompt_batch_size=4, pred_iou_threshold=0.0,
                         add_no_mem_embed=True)
    gen = SAM2ProposalGenerator(model, cfg)
    props = gen.propose(images[:1])[0]

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(SAM_SIZE // s, SAM_SIZE // s) for s in (4, 8, 16)]  # it assumes 1024 px
    predictor.set_image(u8[0])
    for k, (x, y) in enumerate(point_grid(3, SAM_SIZE).tolist()):
        _, ious, low = predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]),
                                         multimask_output=True, return_logits=True)
        best = int(ious.argmax())
        assert props.pred_iou[k].item() == pytest.approx(float(ious[best]), abs=1e-5)
        # the predictor clamps its low-resolution logits to [-32, 32]
        np.testing.assert_allclose(props.logits[k].clamp(-32, 32).numpy(), low[best], atol=1e-3, rtol=1e-4)

    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 255.0, 255.0], [100.0, 90.0, 140.0, 150.0]])
    masks = gen.masks_from_boxes(images[0], boxes)
    assert masks.shape == (3, SAM_SIZE // 4, SAM_SIZE // 4) and masks.dtype == torch.float32
    for k, box in enumerate(boxes.numpy()):
        _, ious, low = predictor.predict(box=box, multimask_output=True, return_logits=True)
        np.testing.assert_allclose(masks[k].clamp(-32, 32).numpy(), low[int(ious.argmax())], atol=1e-3, rtol=1e-4)
    assert gen.masks_from_boxes(images[0], torch.zeros(0, 4)).shape == (0, SAM_SIZE // 4, SAM_SIZE // 4)


def test_proposer_input_errors(sam2_checkpoints):
    model, _ = sam2_checkpoints["sam2.1_hiera_t"]
    with pytest.raises(ValueError, match="built for 256 px but config.image_size is 1024"):
        SAM2ProposalGenerator(model, ProposalConfig())
    gen = SAM2ProposalGenerator(model, ProposalConfig(image_size=SAM_SIZE, points_per_side=2))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 256, 256\]"):
        gen.propose(torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"expected boxes \[K, 4\]"):
        gen.masks_from_boxes(torch.rand(3, SAM_SIZE, SAM_SIZE), torch.zeros(4))


# ============================================================================ DINOv2


def test_dinov2_registry():
    expected = {"dinov2_vits14": ("vit_small_patch14_dinov2", 384), "dinov2_vitb14": ("vit_base_patch14_dinov2", 768),
                "dinov2_vitl14": ("vit_large_patch14_dinov2", 1024),
                "dinov2_vitg14": ("vit_giant_patch14_dinov2", 1536)}
    expected.update({f"{k}_reg": (arch.replace("patch14_", "patch14_reg4_"), dim)
                     for k, (arch, dim) in expected.items()})
    assert {k: (v.timm_arch, v.dim) for k, v in DINOV2_VARIANTS.items()} == expected
    base = "https://dl.fbaipublicfiles.com/dinov2"
    assert DINOV2_VARIANTS["dinov2_vitl14"].checkpoint.url == f"{base}/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    assert DINOV2_VARIANTS["dinov2_vits14_reg"].checkpoint.url == (
        f"{base}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth")
    assert dinov2_variant("dinov2_vitg14_reg4").name == "dinov2_vitg14_reg"
    with pytest.raises(KeyError, match="unknown DINOv2 model"):
        dinov2_variant("dinov3_vits16")


def official_dinov2_state_dict(dim=384, depth=12, heads=6, registers=0, swiglu=False, seed=0):
    """Random weights in the layout of the DINOv2 repository (pos_embed for 518 px: 1 + 37 * 37)."""
    del heads  # the layout does not depend on it
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=gen) * std + mean

    sd = {
        "cls_token": rnd(1, 1, dim, std=1.0),
        "pos_embed": rnd(1, 1 + 37 * 37, dim, std=1.0),
        "mask_token": rnd(1, dim),
        "patch_embed.proj.weight": rnd(dim, 3, 14, 14, std=0.05),
        "patch_embed.proj.bias": rnd(dim, std=0.1),
    }
    if registers:
        sd["register_tokens"] = rnd(1, registers, dim, std=1.0)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim  # DINOv2's SwiGLUFFNFused rule
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": rnd(dim, std=0.1, mean=1.0), p + "norm1.bias": rnd(dim, std=0.1),
            p + "attn.qkv.weight": rnd(3 * dim, dim, std=dim ** -0.5), p + "attn.qkv.bias": rnd(3 * dim, std=0.1),
            p + "attn.proj.weight": rnd(dim, dim, std=dim ** -0.5), p + "attn.proj.bias": rnd(dim, std=0.1),
            p + "ls1.gamma": rnd(dim, std=0.1, mean=0.3),
            p + "norm2.weight": rnd(dim, std=0.1, mean=1.0), p + "norm2.bias": rnd(dim, std=0.1),
            p + "ls2.gamma": rnd(dim, std=0.1, mean=0.3),
        }
        if swiglu:
            sd |= {p + "mlp.w12.weight": rnd(2 * hidden, dim, std=dim ** -0.5), p + "mlp.w12.bias": rnd(2 * hidden),
                   p + "mlp.w3.weight": rnd(dim, hidden, std=hidden ** -0.5), p + "mlp.w3.bias": rnd(dim)}
        else:
            sd |= {p + "mlp.fc1.weight": rnd(hidden, dim, std=dim ** -0.5), p + "mlp.fc1.bias": rnd(hidden),
                   p + "mlp.fc2.weight": rnd(dim, hidden, std=hidden ** -0.5), p + "mlp.fc2.bias": rnd(dim)}
    sd["norm.weight"] = rnd(dim, std=0.1, mean=1.0)
    sd["norm.bias"] = rnd(dim, std=0.1)
    return sd


def reference_dinov2_patch_tokens(sd, images, heads, registers, interpolate_offset, interpolate_antialias):
    """Plain-torch forward of the official DINOv2 ViT, read straight from an official-layout state dict."""
    x = (images - MEAN) / STD
    b = x.shape[0]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)  # [B, D, g, g]
    dim, g = x.shape[1], x.shape[-1]
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, D], row-major patches
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
    pos = sd["pos_embed"]
    m = math.isqrt(pos.shape[1] - 1)
    if m != g:  # DINOv2's interpolate_pos_encoding
        grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        if interpolate_offset:
            kw = {"scale_factor": ((g + interpolate_offset) / m, (g + interpolate_offset) / m)}
        else:
            kw = {"size": (g, g)}
        grid = F.interpolate(grid, mode="bicubic", antialias=interpolate_antialias, **kw)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, dim)], dim=1)
    x = x + pos
    if registers:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    n = x.shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, dim)
        x = x + sd[p + "ls1.gamma"] * F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        if p + "mlp.w12.weight" in sd:  # SwiGLU (ViT-g)
            x1, x2 = F.linear(h, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"]).chunk(2, dim=-1)
            h = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:
            h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2.gamma"] * h
    x = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 1 + registers:].reshape(b, g, g, dim)


@pytest.fixture(scope="module")
def dinov2_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    out = {}
    for name, registers, seed in (("dinov2_vits14", 0, 1), ("dinov2_vits14_reg", 4, 2)):
        sd = official_dinov2_state_dict(registers=registers, seed=seed)
        path = root / DINOV2_VARIANTS[name].checkpoint.filename
        torch.save(sd, path)
        out[name] = (sd, path)
    return out


@pytest.mark.parametrize("name, size", [("dinov2_vits14", 112), ("dinov2_vits14_reg", 112), ("dinov2_vits14", 518)])
def test_dinov2_official_checkpoint_matches_reference_forward(dinov2_checkpoints, name, size):
    sd, path = dinov2_checkpoints[name]
    variant = DINOV2_VARIANTS[name]
    enc = DINOv2Encoder.from_name(name, checkpoint=path, device="cpu", input_size=size)
    assert isinstance(enc, FeatureEncoder)
    assert (enc.name, enc.input_size, enc.patch_size, enc.dim) == (name, size, 14, 384)
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    feats = enc.encode(images)
    assert feats.shape == (2, size // 14, size // 14, 384) and feats.dtype == torch.float32
    with torch.no_grad():
        ref = reference_dinov2_patch_tokens(sd, images, heads=6, registers=variant.registers,
                                            interpolate_offset=variant.interpolate_offset,
                                            interpolate_antialias=variant.interpolate_antialias)
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-4)


def test_dinov2_giant_swiglu_layout_converts():
    """ViT-g's SwiGLU keys (mlp.w12 / mlp.w3) on a shrunken model built like timm's vit_giant_patch14_dinov2."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    dim, heads = 48, 4
    model = VisionTransformer(img_size=42, patch_size=14, embed_dim=dim, depth=2, num_heads=heads, init_values=1e-5,
                              mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, num_classes=0)
    sd = official_dinov2_state_dict(dim=dim, depth=2, heads=heads, swiglu=True, seed=3)
    converted = convert_official_state_dict(sd, model, interpolate_offset=0.1, interpolate_antialias=False)
    model.load_state_dict(converted, strict=True)
    enc = DINOv2Encoder(model, name="tiny-giant")
    images = torch.rand(1, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference_dinov2_patch_tokens(sd, images, heads=heads, registers=0, interpolate_offset=0.1,
                                            interpolate_antialias=False)
    torch.testing.assert_close(enc.encode(images), ref, atol=1e-4, rtol=1e-4)


def test_dinov2_settings_identify_weights(dinov2_checkpoints):
    _, path = dinov2_checkpoints["dinov2_vits14"]
    a = DINOv2Encoder.from_name("dinov2_vits14", checkpoint=path, input_size=56)
    b = DINOv2Encoder.from_name("dinov2_vits14", checkpoint=path, input_size=56)
    other = DINOv2Encoder.from_name("dinov2_vits14", input_size=56, random_init=True)
    settings = a.settings()
    assert json.loads(json.dumps(settings)) == settings
    assert {"name", "input_size", "patch_size", "dim", "normalisation", "weights"} <= set(settings)
    assert (settings["name"], settings["input_size"], settings["patch_size"], settings["dim"]) == (
        "dinov2_vits14", 56, 14, 384)
    assert b.settings() == settings
    assert other.settings()["weights"] != settings["weights"]
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 56, 56\]"):
        a.encode(torch.rand(1, 3, 112, 112))
    with pytest.raises(ValueError, match="multiple of 14"):
        DINOv2Encoder.from_name("dinov2_vits14", input_size=100, random_init=True)


@pytest.mark.parametrize("kind, name, message", [
    ("truncated", "dinov2_vits14", r"cannot read DINOv2 checkpoint .*truncated\.pth.*truncated, corrupt"),
    ("registers", "dinov2_vits14", r"has 4 register token\(s\) but the model expects 0: use the '_reg' variant"),
    ("no_registers", "dinov2_vits14_reg", r"has 0 register token\(s\) but the model expects 4"),
    ("missing", "dinov2_vits14", r"1 missing key\(s\): blocks\.3\.ls2\.gamma"),
    ("extra", "dinov2_vits14", r"1 unexpected key\(s\): head\.weight"),
    ("wrong_size", "dinov2_vitb14", r"shape mismatch.*patch_embed\.proj\.weight: checkpoint \(384, 3, 14, 14\) vs "
                                    r"model \(768, 3, 14, 14\)"),
    ("not_a_state_dict", "dinov2_vits14", r"is not a DINOv2 checkpoint: expected a state dict, got list"),
])
def test_dinov2_bad_checkpoints(dinov2_checkpoints, tmp_path, kind, name, message):
    sd, good = dinov2_checkpoints["dinov2_vits14"]
    sd = dict(sd)
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: 1 << 20])
    elif kind == "registers":
        torch.save(dinov2_checkpoints["dinov2_vits14_reg"][0], path)
    elif kind == "missing":
        del sd["blocks.3.ls2.gamma"]
        torch.save(sd, path)
    elif kind == "extra":
        sd["head.weight"] = torch.zeros(10, 384)
        torch.save(sd, path)
    elif kind == "not_a_state_dict":
        torch.save([torch.zeros(1)], path)
    else:
        torch.save(sd, path)
    size = 518 if kind == "wrong_size" else 56
    with pytest.raises(CheckpointError, match=message) as info:
        DINOv2Encoder.from_name(name, checkpoint=path, input_size=size)
    assert str(path) in str(info.value)


def test_load_dinov2_weights_directly(dinov2_checkpoints):
    from refseg.models.dinov2_encoder import build_dinov2

    sd, path = dinov2_checkpoints["dinov2_vits14_reg"]
    variant = DINOV2_VARIANTS["dinov2_vits14_reg"]
    model = build_dinov2(variant, 518)
    load_dinov2_weights(model, variant, path)
    # at 518 px nothing is interpolated; the class token carries its position embedding in timm's layout
    torch.testing.assert_close(model.pos_embed, sd["pos_embed"][:, 1:])
    torch.testing.assert_close(model.cls_token, sd["cls_token"] + sd["pos_embed"][:, :1])
    torch.testing.assert_close(model.reg_token, sd["register_tokens"])


# ============================================================================ plugins


class FakeProposer:
    """A minimal third-party proposer, built by import path."""

    def __init__(self, device: torch.device, config: ProposalConfig):
        self.name = "fake"
        self.device = device
        self.size = config.image_size // 4

    def propose(self, images):
        return [Proposals.empty(self.size, self.device) for _ in images]

    def masks_from_boxes(self, image, boxes):
        return torch.zeros(len(boxes), self.size, self.size)

    def settings(self):
        return {"name": self.name, "size": self.size}


class FakeEncoder:
    def __init__(self, input_size: int = 28, **kwargs):
        self.name, self.input_size, self.patch_size, self.dim = "fake", input_size, 14, 2
        self.device = kwargs["device"]
        self.extra = sorted(kwargs)

    def encode(self, images):
        g = self.input_size // 14
        return torch.zeros(images.shape[0], g, g, self.dim)

    def settings(self):
        return {"name": self.name}


def test_load_component_errors():
    with pytest.raises(ValueError, match="package.module:Class"):
        load_component("refseg.method.config.ProposalConfig")
    with pytest.raises(ValueError, match="package.module:Class"):
        load_component("refseg.method.config:")
    with pytest.raises(ImportError, match="cannot import module 'refseg_no_such_module'"):
        load_component("refseg_no_such_module:Thing")
    with pytest.raises(AttributeError, match="module 'refseg.method.config' has no attribute 'NoSuchThing'"):
        load_component("refseg.method.config:NoSuchThing")
    with pytest.raises(TypeError, match="not a class or factory"):
        load_component("refseg.method.config:PAPER")
    with pytest.raises(TypeError, match="could not create component"):
        load_component(f"{__name__}:FakeProposer", device="cpu")  # config missing


def test_load_component_passes_accepted_kwargs():
    cfg = load_component("refseg.method.config:ProposalConfig", image_size=256, device="cpu")  # device not accepted
    assert cfg == ProposalConfig(image_size=256)
    assert load_component("refseg.method.config:PipelineConfig.from_dict", data={"name": "x"}).name == "x"


def test_build_by_import_path():
    proposer = build_proposer(f"{__name__}:FakeProposer", device="cpu", config=ProposalConfig(image_size=64))
    assert isinstance(proposer, FakeProposer) and proposer.device == torch.device("cpu") and proposer.size == 16
    encoder = build_encoder(f"{__name__}:FakeEncoder", input_size=42)
    assert encoder.input_size == 42
    assert encoder.extra == ["cache_dir", "checkpoint", "device", "offline", "random_init"]  # **kwargs get all
    with pytest.raises(TypeError, match="does not implement ProposalGenerator.*propose"):
        build_proposer("refseg.method.config:ProposalConfig")
    with pytest.raises(TypeError, match="does not implement FeatureEncoder"):
        build_encoder("refseg.method.config:ProposalConfig")


def test_build_by_registry_name():
    proposer = build_proposer("sam2.1_hiera_t", device="cpu", config=ProposalConfig(image_size=SAM_SIZE),
                              random_init=True)
    assert isinstance(proposer, SAM2ProposalGenerator) and isinstance(proposer, ProposalGenerator)
    assert proposer.name == "sam2.1_hiera_t" and proposer.model.image_size == SAM_SIZE
    encoder = build_encoder("dinov2_vits14_reg4", device="cpu", input_size=56, random_init=True)
    assert isinstance(encoder, DINOv2Encoder) and encoder.name == "dinov2_vits14_reg"
    with pytest.raises(ValueError, match="unknown proposer 'sam9'.*sam2_hiera_l.*package.module:Class"):
        build_proposer("sam9")
    with pytest.raises(ValueError, match="unknown encoder 'clip'.*dinov2_vitl14"):
        build_encoder("clip")


def test_registry_name_offline_without_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)sam2_hiera_large\.pt.*072824/sam2_hiera_large\.pt"):
        build_proposer("sam2_hiera_l", cache_dir=tmp_path, offline=True)
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        build_encoder("dinov2_vitl14", cache_dir=tmp_path, offline=True)


def test_random_init_and_checkpoint_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        load_sam2("sam2.1_hiera_t", checkpoint=tmp_path / "x.pt", image_size=SAM_SIZE, random_init=True)
    with pytest.raises(ValueError, match="not both"):
        DINOv2Encoder.from_name("dinov2_vits14", checkpoint=tmp_path / "x.pth", random_init=True)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    from refseg.models.checkpoints import cache_dir

    assert cache_dir() == Path.home() / ".cache" / "refseg"
    monkeypatch.setenv("REFSEG_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "opt") == tmp_path / "opt"
