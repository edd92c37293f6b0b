"""Models by name: built-ins, torchvision, timm errors, local weights with clear mismatch errors."""
import pytest
import torch

from oba_ext.models import ModelError, WeightsError, get_model, load_weights


@pytest.mark.parametrize("name,depth_convs", [("resnet20", 20), ("resnet32", 32), ("resnet56", 56)])
def test_cifar_resnets(name, depth_convs):
    m = get_model(name, num_classes=7).eval()
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth_convs  # 6n+1 3×3 convs + fc = 6n+2 weighted layers
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_vgg19_and_small_cnn():
    m = get_model("vgg19", num_classes=100).eval()
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 16
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    s = get_model("small_cnn", num_classes=10, in_channels=1).eval()
    assert s(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_torchvision_by_name():
    pytest.importorskip("torchvision")
    m = get_model("resnet18", num_classes=5).eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    tv = get_model("torchvision:vgg11_bn", num_classes=3)
    assert type(tv).__module__.startswith("torchvision")
    with pytest.raises(ModelError, match="no classification model"):
        get_model("torchvision:nope")


def test_unknown_model_and_missing_timm():
    try:
        import timm  # noqa: F401
        has_timm = True
    except ImportError:
        has_timm = False
    with pytest.raises(ModelError, match="no_such_net"):
        get_model("no_such_net")
    if not has_timm:
        with pytest.raises(ModelError, match="timm is not installed"):
            get_model("timm:vit_tiny_patch16_224")


def test_weights_roundtrip_and_prefix(tmp_path):
    a = get_model("resnet20", num_classes=10)
    b = get_model("resnet20", num_classes=10)
    p = tmp_path / "r20.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in a.state_dict().items()}}, p)
    load_weights(b, str(p))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    c = get_model("resnet20", num_classes=10, weights=str(p))
    assert torch.equal(c.fc.weight, a.fc.weight)


def test_weights_mismatch_names_file_and_keys(tmp_path):
    p = tmp_path / "r32.pt"
    torch.save(get_model("resnet32", num_classes=10).state_dict(), p)
    with pytest.raises(WeightsError) as e:
        get_model("resnet20", num_classes=10, weights=str(p))
    assert "r32.pt" in str(e.value) and "unexpected keys" in str(e.value) and "layer1.3" in str(e.value)
    q = tmp_path / "c100.pt"
    torch.save(get_model("resnet20", num_classes=100).state_dict(), q)
    with pytest.raises(WeightsError, match=r"shape mismatches \['fc.weight"):
        get_model("resnet20", num_classes=10, weights=str(q))
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        get_model("resnet20", weights=str(bad))
    with pytest.raises(WeightsError, match="does not exist"):
        get_model("resnet20", weights=str(tmp_path / "missing.pt"))
