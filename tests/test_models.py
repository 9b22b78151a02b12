"""The UNets, the projection head and checkpoint loading."""
from __future__ import annotations

import pytest
import torch

from edgeseg.distill.config import ModelConfig, StudentConfig
from edgeseg.distill.losses import DistillationModel, ProjectionHead
from edgeseg.distill.models import UnetSegmenter, build_model, load_model, load_state_dict
from edgeseg.runtime.errors import InputError

TINY = dict(encoder="tu-test_efficientnet")


@pytest.mark.parametrize("decoder, stride", [((32, 16, 16, 8, 8), 1), ((16, 8, 8, 8), 2), ((16, 8, 8), 4)])
def test_output_is_full_resolution_for_every_decoder_depth(decoder, stride):
    m = UnetSegmenter(TINY["encoder"], decoder)
    assert m.output_stride == stride
    assert m(torch.randn(2, 3, 64, 96)).shape == (2, 1, 64, 96)


def test_b0_student_taps_its_40_channel_stride8_feature_in_one_pass():
    m = build_model(StudentConfig()).eval()
    calls = []
    m.encoder.register_forward_hook(lambda *a: calls.append(1))
    logits, feature = m.forward_features(torch.randn(1, 3, 64, 64))
    assert feature.shape == (1, 40, 8, 8) and m.feature_channels == 40
    assert logits.shape == (1, 1, 64, 64)
    assert len(calls) == 1


def test_smp_unet_state_dict_loads_strictly(tmp_path):
    import segmentation_models_pytorch as smp

    ref = smp.Unet("tu-test_efficientnet", encoder_weights=None, classes=1, decoder_channels=(32, 16, 16, 8, 8)).eval()
    torch.save(ref.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": ref.state_dict(), "epoch": 3}, tmp_path / "dict.pt")
    cfg = ModelConfig(encoder="tu-test_efficientnet", decoder_channels=(32, 16, 16, 8, 8))
    x = torch.randn(1, 3, 64, 64)
    for name in ("plain.pt", "dict.pt"):
        m = load_model(cfg, tmp_path / name).eval()
        assert torch.equal(m(x), ref(x))


def test_wrong_architecture_and_missing_checkpoint_are_clear(tmp_path):
    cfg = ModelConfig(encoder="tu-test_efficientnet", decoder_channels=(32, 16, 16, 8, 8))
    torch.save(build_model(cfg).state_dict(), tmp_path / "t.pt")
    other = ModelConfig(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8))
    with pytest.raises(InputError, match=r"t.pt: weights do not fit a UNet .* decoder \[16, 8, 8, 8\]"):
        load_model(other, tmp_path / "t.pt")
    with pytest.raises(InputError, match=r"nope.pt: checkpoint does not exist"):
        load_model(cfg, tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"bad.pt: not a readable torch checkpoint"):
        load_state_dict(tmp_path / "bad.pt")
    torch.save({"optimizer": {"x": 1}}, tmp_path / "nostudent.pt")
    with pytest.raises(InputError, match=r"nostudent.pt: checkpoint has none of the keys \['student'\]"):
        load_state_dict(tmp_path / "nostudent.pt", keys=("student",))


def test_gradients_reach_every_trainable_parameter_without_nan():
    student = UnetSegmenter(TINY["encoder"], (16, 8, 8, 8))
    net = DistillationModel(student, ProjectionHead(student.feature_channels, 16, 24))
    logits, projected = net(torch.randn(2, 3, 64, 64))
    assert projected.shape == (2, 24, 8, 8)
    (logits.mean() + projected.pow(2).mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # the projection head lives beside the student: the student's state has none of it
    assert not any("projection" in k for k in student.state_dict())


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(InputError, match=r"unknown encoder 'efficientnet-b99'"):
        UnetSegmenter("efficientnet-b99", (16, 8, 8, 8))


def test_relu_student_has_no_silu_and_a_relu_checkpoint_refuses_a_silu_config(tmp_path):
    relu = ModelConfig(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8), activation="relu")
    m = build_model(relu)
    kinds = {type(x).__name__ for x in m.encoder.modules()}
    assert "ReLU" in kinds and "SiLU" not in kinds
    # an edgeseg checkpoint records its model section; the weights alone fit either activation
    ckpt = {"student": m.state_dict(), "identity": {"model": {"encoder": relu.encoder, "activation": "relu"}}}
    torch.save(ckpt, tmp_path / "relu.pt")
    silu = ModelConfig(encoder="tu-test_efficientnet", decoder_channels=(16, 8, 8, 8))
    with pytest.raises(InputError, match=r"relu.pt: was trained with activation relu, the config builds silu; "
                                         r"set activation: relu"):
        load_model(silu, tmp_path / "relu.pt", keys=("student",))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(load_model(relu, tmp_path / "relu.pt", keys=("student",)).eval()(x), m.eval()(x))
    # checkpoints from before the option carry no activation: they are SiLU
    torch.save({"student": build_model(silu).state_dict(), "identity": {"model": {}}}, tmp_path / "old.pt")
    load_model(silu, tmp_path / "old.pt", keys=("student",))
    with pytest.raises(InputError, match="trained with activation silu"):
        load_model(relu, tmp_path / "old.pt", keys=("student",))


def test_activation_option_is_validated():
    from edgeseg.distill.config import ConfigError

    with pytest.raises(ConfigError, match=r"activation.*needs a tu-\* \(timm\) encoder"):
        ModelConfig(encoder="timm-efficientnet-b0", activation="relu")
    with pytest.raises(ConfigError, match=r"activation.*freeze_encoder: true"):
        StudentConfig(activation="relu", freeze_encoder=True)
    with pytest.raises(ConfigError, match=r"activation.*must be silu, relu or relu6"):
        ModelConfig(activation="gelu")
