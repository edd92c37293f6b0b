"""Models by name: built-ins (CIFAR ResNets/VGG, the demo CNN), torchvision, timm.

:func:`get_model` never downloads: pretrained weights come only from a local file
(``weights=PATH``), and a file that does not fit the model raises :class:`WeightsError`
naming the file and the first mismatching keys.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .cifar_resnet import CifarResNet, resnet20, resnet32, resnet56, resnet110
from .cifar_vgg import CifarVGG, vgg16_cifar, vgg19
from .small_cnn import SmallCNN, small_cnn

#: built-in model name -> builder(num_classes=..., in_channels=...)
BUILTIN: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "resnet110": resnet110,
    "vgg19": vgg19, "vgg16_cifar": vgg16_cifar, "small_cnn": small_cnn,
}


class ModelError(ValueError):
    """Unknown model name or a model source that is unavailable."""


class WeightsError(ValueError):
    """A weights file that is missing, unreadable or does not match the model."""


def available_models() -> list:
    """Built-in names plus torchvision's classification models."""
    names = list(BUILTIN)
    try:
        import torchvision
        names += torchvision.models.list_models(module=torchvision.models)
    except Exception:  # pragma: no cover
        pass
    return names


def _torchvision(name: str, num_classes: int, **kw) -> Optional[nn.Module]:
    import torchvision
    if name not in torchvision.models.list_models():
        return None
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)


def _timm(name: str, num_classes: int, **kw) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError(f"model: {name!r} is not a built-in or torchvision model, and timm is not "
                         f"installed (pip install timm) to look it up there") from None
    if name not in timm.list_models():
        raise ModelError(f"model: unknown model {name!r} (not built-in, torchvision or timm)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)


def get_model(name: str, num_classes: int = 10, weights: Optional[str] = None,
              in_channels: Optional[int] = None, **kw) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs, randomly initialised or from ``weights``.

    Lookup: built-ins (:data:`BUILTIN`), then ``torchvision.models.get_model``, then timm
    (``timm:NAME`` / ``torchvision:NAME`` force one source; ``torchvision:vgg19`` is the
    ImageNet VGG, plain ``vgg19`` the built-in CIFAR VGG-BN). ``in_channels`` applies to
    built-ins only.
    """
    if not isinstance(name, str) or not name:
        raise ModelError(f"model: expected a model name, got {name!r}")
    if name in BUILTIN:
        if in_channels is not None:
            kw["in_channels"] = in_channels
        model = BUILTIN[name](num_classes=num_classes, **kw)
    elif name.startswith("timm:"):
        model = _timm(name[5:], num_classes, **kw)
    elif name.startswith("torchvision:"):  # e.g. torchvision:vgg19 (the built-in vgg19 is CIFAR's)
        model = _torchvision(name[len("torchvision:"):], num_classes, **kw)
        if model is None:
            raise ModelError(f"model: torchvision has no classification model {name[12:]!r}")
    else:
        model = _torchvision(name, num_classes, **kw)
        if model is None:
            model = _timm(name, num_classes, **kw)
    if weights is not None:
        load_weights(model, weights)
    return model


def _state_dict_of(obj, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                return _state_dict_of(obj[key], path)
        if all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
            return obj
    raise WeightsError(f"weights: {path!r} holds a {type(obj).__name__}, not a state dict "
                       f"(expected a dict of tensors, or one under 'state_dict'/'model')")


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a local state-dict file into ``model`` (strict). A ``module.`` prefix (from
    DataParallel/DDP) is stripped. Raises :class:`WeightsError` naming the file and the first
    missing / unexpected / shape-mismatching keys."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights: file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"weights: cannot read {path!r} as a PyTorch file: {e}") from None
    sd = _state_dict_of(obj, path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        if shapes:
            parts.append(f"shape mismatches {shapes[:5]}" + (" ..." if len(shapes) > 5 else ""))
        raise WeightsError(f"weights: {path!r} does not match {type(model).__name__}: "
                           + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


__all__ = ["BUILTIN", "ModelError", "WeightsError", "get_model", "load_weights", "available_models",
           "CifarResNet", "CifarVGG", "SmallCNN", "resnet20", "resnet32", "resnet56", "resnet110",
           "vgg19", "vgg16_cifar", "small_cnn"]
