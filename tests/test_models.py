"""xdtrain.models: shapes, encoder export and loading, linear evaluation."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from xdtrain.errors import UserError
from xdtrain.models import MODELS, export_encoder, get_model
from xdtrain.models.encoders import adapt_first_conv


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_unet_gives_logits_at_input_size(size, channels):
    model = get_model("unet_resnet18", num_classes=4, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(1, channels, size, size))
    assert out.shape == (1, 4, size, size)


def test_unet_resnet50_and_classifier_and_simclr_shapes():
    x = torch.randn(2, 3, 64, 64)
    assert get_model("unet_resnet50", num_classes=3).eval()(x).shape == (2, 3, 64, 64)
    assert get_model("resnet34", num_classes=15).eval()(x).shape == (2, 15)
    simclr = get_model("simclr_resnet18", projection_dims=[512, 128]).eval()
    assert simclr(x).shape == (2, 128)
    study = get_model("simclr_resnet18", projection_dims=[512, 512, 64], projection_sigmoid=True)
    z = study.eval()(x)
    assert z.shape == (2, 64) and z.min() >= 0 and z.max() <= 1
    linears = [m for m in study.head if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3


def test_unet_rejects_sizes_that_are_not_multiples_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        get_model("unet_resnet18", num_classes=2)(torch.randn(1, 3, 48, 48))


def test_bad_names_and_missing_classes_fail_clearly():
    with pytest.raises(UserError, match="unknown model"):
        get_model("resnet51")
    with pytest.raises(UserError, match="num_classes"):
        get_model("resnet18")
    assert "unet_resnet50" in MODELS and "simclr_resnet34" in MODELS


def test_exported_encoder_loads_into_torchvision_with_only_fc_missing(tmp_path):
    model = get_model("simclr_resnet50", projection_dims=[2048, 128])
    path = export_encoder(model, tmp_path / "encoder.pt")
    reference = torchvision.models.resnet50()
    result = reference.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(reference.conv1.weight, model.encoder.conv1.weight)


@pytest.mark.parametrize("source", ["encoder", "checkpoint", "torchvision", "ddp"])
def test_encoder_weights_load_from_every_format(tmp_path, source):
    donor = get_model("unet_resnet18", num_classes=3)
    path = tmp_path / "w.pt"
    if source == "encoder":
        export_encoder(donor, path)
    elif source == "checkpoint":
        torch.save({"model": donor.state_dict(), "epoch": 3}, path)
    elif source == "torchvision":
        tv = torchvision.models.resnet18()
        tv.load_state_dict(
            donor.encoder.state_dict() | {"fc.weight": tv.fc.weight, "fc.bias": tv.fc.bias}
        )
        torch.save(tv.state_dict(), path)
    else:
        torch.save({f"module.{k}": v for k, v in donor.state_dict().items()}, path)
    model = get_model("resnet18", num_classes=5, encoder_weights=str(path))
    report = model.encoder_load_report
    assert report.missing == [] and report.unexpected == []
    for key, value in donor.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key


def test_weights_whose_keys_match_nothing_fail(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"transformer.blocks.0.attn.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError, match="no key matches the resnet18 encoder") as info:
        get_model("resnet18", num_classes=2, encoder_weights=str(path))
    assert "\n" not in str(info.value)


def test_partial_matches_are_reported(tmp_path, caplog):
    donor = get_model("resnet18", num_classes=2)
    state = {k: v for k, v in donor.encoder.state_dict().items() if not k.startswith("layer4")}
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pt")
    with caplog.at_level(logging.WARNING, logger="xdtrain.models"):
        model = get_model("resnet18", num_classes=2, encoder_weights=str(tmp_path / "partial.pt"))
    report = model.encoder_load_report
    assert report.unexpected == ["extra.weight"]
    assert report.missing and all(k.startswith("layer4") for k in report.missing)
    assert "missing" in caplog.text


def test_damaged_or_missing_weights_give_one_line(tmp_path):
    with pytest.raises(UserError, match="no such weights file"):
        get_model("resnet18", num_classes=2, encoder_weights=str(tmp_path / "none.pt"))
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="not a readable weights file") as info:
        get_model("resnet18", num_classes=2, encoder_weights=str(tmp_path / "bad.pt"))
    assert "\n" not in str(info.value)


def test_wrong_depth_names_the_key(tmp_path):
    export_encoder(get_model("resnet50", num_classes=2), tmp_path / "r50.pt")
    with pytest.raises(UserError, match=r"same architecture as model.name \(resnet18\)"):
        get_model("resnet18", num_classes=2, encoder_weights=str(tmp_path / "r50.pt"))


def test_first_conv_is_adapted_to_other_channel_counts(tmp_path):
    donor = get_model("resnet18", num_classes=2)
    export_encoder(donor, tmp_path / "rgb.pt")
    grey = get_model(
        "unet_resnet18", num_classes=2, in_channels=1, encoder_weights=str(tmp_path / "rgb.pt")
    )
    assert grey.encoder_load_report.adapted == ["conv1.weight"]
    x = torch.rand(1, 1, 64, 64)
    rgb_out = torch.nn.functional.conv2d(
        x.repeat(1, 3, 1, 1), donor.encoder.conv1.weight, stride=2, padding=3
    )
    grey_out = torch.nn.functional.conv2d(x, grey.encoder.conv1.weight, stride=2, padding=3)
    assert torch.allclose(rgb_out, grey_out, atol=1e-5)  # same response to a grey image
    four = adapt_first_conv(donor.encoder.conv1.weight, 4)
    assert four.shape[1] == 4
    assert torch.allclose(four.sum(1), donor.encoder.conv1.weight.sum(1), atol=1e-6)


def test_linear_evaluation_keeps_encoder_weights_and_batchnorm_statistics():
    model = get_model("resnet18", num_classes=3, frozen_encoder=True)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.fc.weight.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    assert not model.encoder.training and model.fc.training
    loss = torch.nn.functional.cross_entropy(
        model(torch.randn(8, 3, 64, 64) * 3 + 1), torch.arange(8) % 3
    )
    loss.backward()
    optimiser.step()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and running statistics alike
    assert not torch.equal(model.fc.weight, head_before)
    # without freezing, the same step moves the batch-norm statistics (the test has power)
    free = get_model("resnet18", num_classes=3).train()
    running = free.encoder.bn1.running_mean.clone()
    free(torch.randn(8, 3, 64, 64) * 3 + 1)
    assert not torch.equal(free.encoder.bn1.running_mean, running)
