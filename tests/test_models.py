import pytest
import torch

from dml.models import (EmbeddingNet, WeightsUnavailable, build_model, describe_stages,
                        list_models, parameter_counts)


@pytest.mark.parametrize("size", [8, 28, 64])
def test_small_cnn_shapes_and_unit_norm(size):
    model = build_model("small-cnn", 1, size, embedding_dim=16).eval()
    z = model(torch.randn(5, 1, size, size))
    assert z.shape == (5, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("name,channels,size", [("small-cnn", 1, 28), ("small-cnn", 3, 32),
                                                ("resnet18", 1, 32), ("resnet18", 3, 32)])
def test_staged_forward_composes_to_full_forward(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, size, embedding_dim=8).eval()
    x = torch.randn(3, channels, size, size)
    full = model(x)
    for k in range(model.num_stages + 1):
        h = model.forward_to(x, k)
        torch.testing.assert_close(model.forward_from(h, k), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.forward_to(x, 0), x)  # stage 0 is the input itself
    with pytest.raises(ValueError, match="stage must be in 0.."):
        model.forward_to(x, model.num_stages + 1)


def test_head_bn_and_unnormalised_option():
    model = build_model("small-cnn", 1, 28, embedding_dim=8, head_bn=True, normalize=False)
    z = model(torch.randn(6, 1, 28, 28))
    assert not torch.allclose(z.norm(dim=1), torch.ones(6))
    assert model.head_bn is not None


def test_pretrained_weights_unavailable_gives_clear_message(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def no_network(self, *a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailable) as err:
        build_model("resnet18", 3, 32, pretrained=True)
    msg = str(err.value)
    assert "ImageNet weights" in msg and "hub/checkpoints" in msg and "pretrained=false" in msg


def test_resnet_weights_from_local_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = build_model("resnet18", 3, 32, weights_path=str(path))
    torch.testing.assert_close(model.stages[1][0].conv1.weight, ref.layer1[0].conv1.weight)
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(WeightsUnavailable, match="not a torchvision resnet18"):
        build_model("resnet18", 3, 32, weights_path=str(bad))


def test_registry_errors_list_valid_choices():
    with pytest.raises(ValueError, match="valid names: small-cnn, resnet18, resnet50"):
        build_model("vgg", 1, 28)
    with pytest.raises(ValueError, match="unknown parameter"):
        build_model("small-cnn", 1, 28, widht=3)
    assert set(list_models()) == {"small-cnn", "resnet18", "resnet50"}


def test_parameter_counts_and_stage_description():
    model = build_model("small-cnn", 1, 28, embedding_dim=8, width=4)
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    stages = describe_stages(model, 1, 28)
    assert [s["stage"] for s in stages] == list(range(model.num_stages + 1))
    assert stages[0]["shape"] == [1, 28, 28] and stages[-1]["shape"][1:] == [1, 1]
    assert isinstance(model, EmbeddingNet)


def test_bn_freeze_keeps_running_statistics_and_affine_parameters():
    # official Metrix / Proxy Synthesis bn_freeze: BatchNorm2d in eval mode while training and
    # its weight and bias not trained; the head and convolutions still train.
    torch.manual_seed(0)
    frozen = build_model("small-cnn", 1, 16, 8, width=4, bn_freeze=True, head_bn=True)
    frozen.train()
    bns = [m for m in frozen.stages.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 4 and not any(bn.training for bn in bns)
    assert frozen.head_bn.training                               # the head's BN is not frozen
    before = [bn.running_mean.clone() for bn in bns]
    x = torch.randn(8, 1, 16, 16) * 3 + 1
    frozen(x).sum().backward()
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    assert all(bn.weight.grad is None and bn.bias.grad is None for bn in bns)
    assert frozen.head.weight.grad is not None
    # without a head BN, a frozen model is the same function in train and eval mode
    no_head = build_model("small-cnn", 1, 16, 8, width=4, bn_freeze=True).train()
    y_train = no_head(x)
    torch.testing.assert_close(no_head.eval()(x), y_train)
    plain = build_model("small-cnn", 1, 16, 8, width=4)
    plain.train()
    assert all(m.training for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_bn_freeze_stats_keeps_statistics_and_trains_the_affine_parameters():
    # official Proxy Synthesis --freeze_BN: BatchNorm2d in eval mode, weight and bias trained
    model = build_model("small-cnn", 1, 16, 8, width=4, bn_freeze="stats").train()
    bns = [m for m in model.stages.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(bn.training for bn in bns)
    before = [bn.running_var.clone() for bn in bns]
    model(torch.randn(8, 1, 16, 16) * 3).sum().backward()
    assert all(torch.equal(b, bn.running_var) for b, bn in zip(before, bns))
    assert all(bn.weight.grad is not None and bn.bias.grad is not None for bn in bns)
    with pytest.raises(ValueError, match="bn_freeze"):
        build_model("small-cnn", 1, 16, 8, width=4, bn_freeze="sometimes")
