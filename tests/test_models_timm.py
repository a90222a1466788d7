"""timm backbones as classifier, SimCLR and U-Net encoders, checked against timm itself.

Tiny timm models stand for their families: ``test_vit`` (ViT, one stride), ``test_convnext``
(ConvNeXt, 1/4 ... 1/32), ``resnet10t`` (timm ResNet, 1/2 ... 1/32) and
``test_efficientnet`` (EfficientNet). Nothing is downloaded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.optim import param_groups_weight_decay

from xdtrain.errors import UserError
from xdtrain.models import backbones, export_encoder, get_model, parse_name
from xdtrain.optim import param_groups

FAMILIES = ["test_vit", "test_convnext", "resnet10t", "test_efficientnet"]
KINDS = ["classifier", "simclr", "unet"]


def build(name: str, kind: str, channels: int = 3, size: int = 64, **kwargs):
    return get_model(
        f"timm/{name}", num_classes=3, in_channels=channels, kind=kind, image_size=size,
        projection_dims=[32, 8], **kwargs,
    )  # fmt: skip


def timm_encoder(name: str, **kwargs) -> torch.nn.Module:
    """The reference: timm's own backbone, as a user would create it to load encoder.pt."""
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


@pytest.mark.parametrize(
    "name, kind",
    [("test_vit", "unet"), ("test_convnext", "simclr"), ("resnet10t", "classifier"),
     ("test_efficientnet", "unet")],
)  # fmt: skip
def test_exported_encoder_loads_into_timm_with_every_key(name, kind, tmp_path):
    model = build(name, kind, channels=4)
    with torch.no_grad():  # weights no initialisation would give
        for param in model.encoder.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    path = export_encoder(model, tmp_path / "encoder.pt")
    reference = timm_encoder(name, in_chans=4)
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[key]), key
    # and back into every kind of network, every key found
    for other in KINDS:
        again = build(name, other, channels=4, encoder_weights=str(path))
        report = again.encoder_load_report
        assert report.missing == [] and report.unexpected == [] and report.adapted == []
        assert len(report.loaded) == len(reference.state_dict())


@pytest.mark.parametrize("name", FAMILIES)
def test_networks_give_their_shapes_and_every_trainable_parameter_a_gradient(name):
    # DDP (find_unused_parameters=False) fails on a trainable parameter without gradient:
    # the U-Net freezes what its feature maps never reach (a ViT's final norm)
    x = torch.randn(2, 4, 64, 64)
    for kind, shape in zip(KINDS, [(2, 3), (2, 8), (2, 3, 64, 64)], strict=True):
        model = build(name, kind, channels=4).train()
        out = model(x)
        assert out.shape == shape
        out.float().square().mean().backward()
        idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert idle == [], (kind, idle)
        frozen = [n for n, p in model.encoder.named_parameters() if not p.requires_grad]
        assert kind == "unet" or frozen == []


@pytest.mark.parametrize("name", FAMILIES)
def test_unet_skips_are_the_maps_of_timm_features_only(name):
    """The U-Net reads the maps ``timm.create_model(name, features_only=True)`` gives, with
    the channels and reductions of its ``feature_info``."""
    encoder = build(name, "classifier").encoder.eval()
    indices, levels = backbones.feature_levels(encoder)
    extra = {"dynamic_img_size": True} if "vit" in name else {}
    reference = timm.create_model(
        name, pretrained=False, features_only=True, out_indices=indices, **extra
    )

    def plain(key: str) -> str:  # features_only flattens stages.0 into stages_0
        return key.removeprefix("model.").replace("_", ".")

    ours = {plain(k): v for k, v in encoder.state_dict().items()}
    reference.load_state_dict({k: ours[plain(k)] for k in reference.state_dict()})
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        mine, theirs = backbones.feature_maps(encoder, x, indices), reference(x)
    assert [level.channels for level in levels] == reference.feature_info.channels()
    assert [level.reduction for level in levels] == reference.feature_info.reduction()
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vit_unet_reads_four_blocks_through_the_pyramid():
    model = build("test_vit", "unet")
    depth = len(model.encoder.blocks)
    assert model.indices == [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
    assert model.reductions == (4, 8, 16, 32) and model.stride == 32
    widths = [block.up.in_channels for block in model.decoder]
    assert len(model.decoder) == 5 and widths[0] == model.adapter.widths[-1]
    # ConvNeXt has no 1/2 map: the fourth block has no skip
    convnext = build("test_convnext", "unet")
    skips = [b.conv[0].in_channels - b.up.out_channels for b in convnext.decoder]
    assert skips == [48, 32, 24, 0, 0]


def test_first_convolution_follows_timms_in_chans_rules(tmp_path):
    """RGB weights into 1 channel: the sum over RGB, so a grey image gives the RGB model's
    response to the same image in three equal channels; into 4: timm's repeat x 3/4."""
    rgb = build("test_convnext", "simclr")
    path = export_encoder(rgb, tmp_path / "rgb.pt")
    weight = rgb.encoder.stem[0].weight.detach()
    grey = build("test_convnext", "classifier", channels=1, encoder_weights=str(path))
    assert grey.encoder_load_report.adapted == ["stem.0.weight"]
    torch.testing.assert_close(grey.encoder.stem[0].weight, weight.sum(dim=1, keepdim=True))
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            grey.encoder.eval()(image), rgb.encoder.eval()(image.expand(-1, 3, -1, -1)),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
    four = build("test_convnext", "unet", channels=4, encoder_weights=str(path))
    expected = torch.cat([weight, weight], dim=1)[:, :4] * 3 / 4
    torch.testing.assert_close(four.encoder.stem[0].weight, expected)


def test_vit_position_embeddings_are_resampled_to_the_models_grid(tmp_path):
    other = timm_encoder("test_vit", img_size=96)  # a 6 x 6 grid; ours keeps timm's 10 x 10
    torch.save(other.state_dict(), tmp_path / "vit96.pt")
    model = build("test_vit", "classifier", encoder_weights=str(tmp_path / "vit96.pt"))
    assert model.encoder_load_report.adapted == ["pos_embed"]
    # the reference: each channel's 6 x 6 grid resized by PIL's bicubic filter (what timm's
    # antialiased resampling matches); the class token is kept as it is
    old = other.pos_embed.detach()[0]
    grids = old[1:].reshape(6, 6, -1).numpy()
    resized = [
        np.asarray(Image.fromarray(grids[:, :, c], mode="F").resize((10, 10), Image.BICUBIC))
        for c in range(grids.shape[-1])
    ]
    expected = torch.from_numpy(np.stack(resized, axis=-1).reshape(100, -1))
    new = model.encoder.pos_embed.detach()[0]
    assert torch.equal(new[:1], old[:1])
    torch.testing.assert_close(new[1:], expected, rtol=1e-4, atol=1e-5)


def test_timm_checkpoints_with_a_classifier_and_safetensors_load(tmp_path):
    full = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    save_file(full.state_dict(), str(tmp_path / "model.safetensors"))
    model = build("resnet10t", "unet", encoder_weights=str(tmp_path / "model.safetensors"))
    report = model.encoder_load_report
    assert report.missing == [] and report.unexpected == []  # fc.* is the classifier
    assert torch.equal(model.encoder.conv1[0].weight, full.conv1[0].weight)
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "head_only.pt")
    with pytest.raises(UserError, match="no key matches the timm/resnet10t encoder"):
        build("resnet10t", "classifier", encoder_weights=str(tmp_path / "head_only.pt"))
    wider = timm_encoder("test_convnext2")  # the same keys, other widths
    torch.save(wider.state_dict(), tmp_path / "convnext2.pt")
    expected = (
        r"stem.0.weight has shape \(32, 3, 4, 4\), the model needs \(24, 3, 4, 4\); "
        r"is it the same architecture as model.name \(timm/test_convnext\)"
    )
    with pytest.raises(UserError, match=expected):
        build("test_convnext", "classifier", encoder_weights=str(tmp_path / "convnext2.pt"))


@pytest.mark.parametrize("name", FAMILIES)
def test_no_decay_group_is_timms(name):
    """Biases, every norm's parameters and ``no_weight_decay()`` (pos_embed, cls_token)
    get neither decay nor LARS adaptation: the set timm's ``param_groups_weight_decay``
    leaves undecayed, plus the projection head's."""
    model = build(name, "simclr")
    ids = {id(p): n for n, p in model.named_parameters()}
    decayed, plain = ({ids[id(p)] for p in group["params"]} for group in param_groups(model, 0.1))
    listed = model.encoder.no_weight_decay() if hasattr(model.encoder, "no_weight_decay") else ()
    theirs = param_groups_weight_decay(model.encoder, 0.1, no_weight_decay_list=listed)
    enc_ids = {id(p): n for n, p in model.encoder.named_parameters()}
    timm_plain = {"encoder." + enc_ids[id(p)] for p in theirs[0]["params"]}
    timm_decay = {"encoder." + enc_ids[id(p)] for p in theirs[1]["params"]}
    assert {n for n in plain if n.startswith("encoder.")} == timm_plain
    assert {n for n in decayed if n.startswith("encoder.")} == timm_decay
    assert {n for n in plain if n.startswith("head.")} == {
        n for n, p in model.head.named_parameters(prefix="head") if p.ndim == 1
    }
    if name == "test_vit":
        assert {"encoder.pos_embed", "encoder.cls_token"} <= plain


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet"])
def test_linear_evaluation_freezes_any_norm(name):
    model = build(name, "classifier", frozen_encoder=True)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    assert not model.encoder.training and model.fc.training
    for _ in range(3):
        optimiser.zero_grad()
        model(torch.randn(4, 3, 64, 64) * 3 + 1).logsumexp(1).mean().backward()
        optimiser.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN buffers too
    assert not torch.equal(model.fc.weight, torch.zeros_like(model.fc.weight))


def test_image_sizes_are_checked_in_one_line():
    patches = "data.image_size 72: timm/test_vit cuts images into 16 px patches; use a multiple"
    with pytest.raises(UserError, match=patches):
        build("test_vit", "classifier", size=72)
    with pytest.raises(UserError, match="a U-Net on timm/test_convnext needs a multiple of 32"):
        build("test_convnext", "unet", size=48)
    with pytest.raises(UserError, match="a U-Net on timm/test_vit needs a multiple of 32"):
        build("test_vit", "unet", size=80)  # 5 x 5 patches: no 1/32 level
    # a fixed-size model is built for the data's size (its relative position tables)
    relpos = build("test_vit_relpos", "classifier", size=64)
    assert relpos.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    # one it cannot take: timm's own message, the model and its default size
    refused = r"timm/test_maxvit does not take 72 x 72 images \(.*window.*data.image_size=160"
    with pytest.raises(UserError, match=refused):
        build("test_maxvit", "classifier", size=72)
    with pytest.raises(UserError, match="'timm/not_a_model' is not a timm model"):
        get_model("timm/not_a_model", num_classes=2)
    with pytest.raises(UserError, match="timm cannot build 'timm/test_vit.augreg_in21k': Inv"):
        get_model("timm/test_vit.augreg_in21k", num_classes=2)  # a tag test_vit lacks
    with pytest.raises(UserError, match="for a U-Net a multiple of 224, e.g. 224"):
        build("eva02_tiny_patch14_224", "unet", size=256)
    with pytest.raises(UserError, match="a U-Net on timm/eva02_tiny_patch14_224 needs a multi"):
        build("eva02_tiny_patch14_224", "unet", size=252)


def test_names_and_kinds():
    assert parse_name("timm/convnext_tiny") == (None, "timm/convnext_tiny")
    assert parse_name("unet_timm/convnext_tiny") == ("unet", "timm/convnext_tiny")
    assert parse_name("simclr_resnet50") == ("simclr", "resnet50")
    with pytest.raises(UserError, match="unknown model"):
        parse_name("vit_timm/convnext_tiny")
    with pytest.raises(UserError, match="is a unet model, not a classifier"):
        get_model("unet_timm/test_convnext", num_classes=2, kind="classifier")
    model = get_model("timm/test_convnext", num_classes=2)  # a classifier by default
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_stage_embeddings_are_the_levels_then_the_pooled_output():
    encoder = build("test_convnext", "classifier").encoder.eval()
    names = backbones.stage_names(encoder)
    assert names == ["stages.0", "stages.1", "stages.2", "stages.3", "output"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedded = backbones.stage_embeddings(encoder, x)
        pooled = encoder(x)
        maps = encoder.forward_intermediates(x, intermediates_only=True)
    assert [e.shape[1] for e in embedded] == [24, 32, 48, 64, 64]
    torch.testing.assert_close(embedded[-1], pooled)
    torch.testing.assert_close(embedded[2], maps[2].mean(dim=(2, 3)))
    assert math.isfinite(float(embedded[0].sum()))


def test_unet_fits_maps_of_unpadded_backbones_to_their_skips():
    """MobileViT-v2's 1/32 map of a 96 px input is 4 x 4, not 3 x 3: the decoder resizes
    the upsampled map to its skip and the output to the input."""
    model = build("mobilevitv2_050", "unet", size=96)
    maps = backbones.feature_maps(model.encoder, torch.zeros(1, 3, 96, 96), model.indices)
    assert [m.shape[-1] for m in maps] == [48, 24, 12, 6, 4]
    out = model.train()(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 3, 96, 96)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_weights_of_another_size_go_through_timms_checkpoint_filter(tmp_path):
    """MaxViT's relative-position tables depend on the image size: timm's own filter
    resizes them, and the report says which tensors were adapted."""
    small = build("test_maxvit", "simclr", size=64)
    path = export_encoder(small, tmp_path / "maxvit64.pt")
    model = build("test_maxvit", "classifier", size=96, encoder_weights=str(path))
    report = model.encoder_load_report
    assert report.missing == [] and report.unexpected == []
    tables = [k for k in report.loaded if k.endswith("relative_position_bias_table")]
    assert tables and set(tables) <= set(report.adapted)


def test_a_timm_backbone_with_its_own_encoder_module_round_trips(tmp_path):
    """Qwen3-ViT's top module is called ``encoder``: its file is read as a bare encoder,
    not stripped as if it were a whole xdtrain network."""
    from xdtrain.models.classifier import Classifier
    from xdtrain.models.weights import load_encoder

    def encoder():
        net = timm.create_model("qwen3_vit_88m", pretrained=False, num_classes=0, depth=1)
        net.backbone_name = "timm/qwen3_vit_88m"
        return net

    path = export_encoder(Classifier(encoder(), 768, 2), tmp_path / "encoder.pt")
    bare = export_encoder(encoder(), tmp_path / "bare.pt")
    for file in (path, bare):
        keys = list(torch.load(file, weights_only=True))
        assert keys == list(encoder().state_dict())  # encoder.pos_embed, ...: timm's keys
        report = load_encoder(encoder(), file)
        assert report.missing == [] and report.unexpected == []


def test_a_timm_training_checkpoint_loads(tmp_path):
    """timm's train.py saves ``{"state_dict", "args": argparse.Namespace, ...}``."""
    import argparse

    trained = timm.create_model("test_convnext", pretrained=False, num_classes=10)
    torch.save(
        {"epoch": 3, "state_dict": trained.state_dict(), "args": argparse.Namespace(lr=0.1)},
        tmp_path / "checkpoint-3.pth.tar",
    )
    model = build("test_convnext", "unet", encoder_weights=str(tmp_path / "checkpoint-3.pth.tar"))
    assert model.encoder_load_report.missing == [] == model.encoder_load_report.unexpected
    assert torch.equal(model.encoder.stem[0].weight, trained.stem[0].weight)
