"""Embedding networks with a staged forward, so a mixing strategy can act on the input, on the
output of any stage, or on the embedding.

Every model is an :class:`EmbeddingNet`: ``stages`` (a list of modules run in order), a global
pooling, a linear embedding head and L2 normalisation. Stage ``k`` means "the representation after
the first ``k`` stages": ``k = 0`` is the input image itself, ``k = num_stages`` the last feature
map before pooling. Hence::

    model(x) == model.forward_from(model.forward_to(x, k), k)      for every k

which is what makes feature-level mixing at stage 0 identical to input mixing.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dml.config import check_params
from dml.registry import Registry


class EmbeddingNet(nn.Module):
    """stages -> global pool -> linear head (-> BatchNorm) -> L2 normalise.

    Args:
        stages: modules applied in order; stage ``i`` maps the output of stage ``i-1``.
        feature_dim: channels of the last stage's output.
        embedding_dim: size D of the embedding.
        pool: ``"avg"``, ``"max"`` or ``"avgmax"`` (sum of both, common for DML backbones).
        head_bn: BatchNorm1d on the embedding before normalisation (helps batch-hard mining avoid
            collapse, docs/METHODS.md section 8).
        normalize: L2-normalise the output (the default; losses expect unit vectors).
        bn_freeze: freeze the BatchNorm2d layers of the stages. ``True`` (or ``"all"``): they stay
            in eval mode (running statistics, never updated) when the model trains, and their
            affine parameters are not trained, as the official Metrix code by default
            (``bn_freeze=1``). ``"stats"``: eval mode only, the affine parameters train, as the
            official Proxy Synthesis code's ``--freeze_BN``. Meant for pretrained backbones; the
            head's BatchNorm1d (``head_bn``) is never frozen.
    """

    def __init__(self, stages: list[nn.Module], feature_dim: int, embedding_dim: int = 128,
                 pool: str = "avg", head_bn: bool = False, normalize: bool = True,
                 stage_names: list[str] | None = None, bn_freeze: bool | str = False):
        super().__init__()
        if pool not in ("avg", "max", "avgmax"):
            raise ValueError(f"unknown pool {pool!r}; valid: avg, max, avgmax")
        self.stages = nn.ModuleList(stages)
        self.stage_names = stage_names or [f"stage{i + 1}" for i in range(len(stages))]
        self.pool = pool
        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.head_bn = nn.BatchNorm1d(embedding_dim) if head_bn else None
        self.normalize = normalize
        if bn_freeze not in (False, True, "all", "stats"):
            raise ValueError(f"bn_freeze must be false, true / 'all' (statistics and affine "
                             f"parameters) or 'stats' (statistics only), got {bn_freeze!r}")
        self.bn_freeze = "all" if bn_freeze is True else (bn_freeze or False)
        for bn in self.frozen_batchnorms():
            if self.bn_freeze == "all":
                bn.weight.requires_grad_(False)
                bn.bias.requires_grad_(False)
            bn.eval()

    def frozen_batchnorms(self) -> list[nn.BatchNorm2d]:
        """The stages' BatchNorm2d layers kept in eval mode (``bn_freeze``), else none."""
        if not self.bn_freeze:
            return []
        return [m for m in self.stages.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True) -> "EmbeddingNet":
        super().train(mode)
        for bn in self.frozen_batchnorms():   # frozen layers keep their running statistics
            bn.eval()
        return self

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage <= self.num_stages:
            raise ValueError(f"stage must be in 0..{self.num_stages} "
                             f"(0 = input, {self.num_stages} = last feature map), got {stage}")

    def forward_to(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Representation after the first ``stage`` stages. (B, C, H, W) -> (B, C_k, H_k, W_k)."""
        self._check_stage(stage)
        for block in self.stages[:stage]:
            x = block(x)
        return x

    def forward_from(self, h: torch.Tensor, stage: int) -> torch.Tensor:
        """Finish the forward pass from the output of ``stage`` stages. -> (B, D) embeddings."""
        self._check_stage(stage)
        for block in self.stages[stage:]:
            h = block(h)
        return self.embed_features(h)

    def embed_features(self, h: torch.Tensor) -> torch.Tensor:
        """Last feature map (B, C, H, W) -> embeddings (B, D)."""
        if self.pool == "avg":
            f = h.mean(dim=(2, 3))
        elif self.pool == "max":
            f = h.amax(dim=(2, 3))
        else:
            f = h.mean(dim=(2, 3)) + h.amax(dim=(2, 3))
        return self.embed_pooled(f)

    def embed_pooled(self, f: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, feature_dim) -> embeddings (B, D), normalised if configured."""
        z = self.head(f)
        if self.head_bn is not None:
            z = self.head_bn(z)
        return F.normalize(z, dim=1) if self.normalize else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) float -> embeddings (B, D)."""
        return self.forward_from(x, 0)


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                               nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 1, image_size: int = 28, embedding_dim: int = 128,
              width: int = 64, depth: int = 4, **head) -> EmbeddingNet:
    """The 4-block Conv-BN-ReLU-MaxPool network of few-shot learning, for 8-64 px images.

    A block pools only while the map is at least 2 px wide, so 8 px digits and 64 px images
    both work: 28 px -> 14 -> 7 -> 3 -> 1.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    stages, size, c = [], image_size, in_channels
    for i in range(depth):
        pool = size >= 2
        out = width if i < depth - 1 else width * 2
        stages.append(conv_block(c, out, pool))
        size = size // 2 if pool else size
        c = out
    return EmbeddingNet(stages, c, embedding_dim, **head)


class _GreyToRGB(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded here."""


def _torchvision_resnet(depth: int, in_channels: int, embedding_dim: int, pretrained: bool,
                        weights_path: str | None = None, **head) -> EmbeddingNet:
    import torchvision

    ctor = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
    weights_enum = {18: torchvision.models.ResNet18_Weights,
                    50: torchvision.models.ResNet50_Weights}[depth]
    net = ctor(weights=None)
    if weights_path:
        if not os.path.isfile(weights_path):
            raise WeightsUnavailable(f"weights file {weights_path!r} does not exist")
        state = _load_state_dict_file(weights_path)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise WeightsUnavailable(
                f"{weights_path!r} is not a torchvision resnet{depth} state dict "
                f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    elif pretrained:
        weights = weights_enum.DEFAULT
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # no network, proxy, corrupt cache...
            raise WeightsUnavailable(
                f"could not load ImageNet weights for resnet{depth} ({type(exc).__name__}: {exc}). "
                f"Tango looks for them in torch's cache ($TORCH_HOME/hub/checkpoints/, file "
                f"{os.path.basename(weights.url)}); download that file on a machine with internet "
                f"and copy it there, pass model.weights_path=FILE, or train from scratch with "
                f"model.pretrained=false.") from exc
        net.load_state_dict(state)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    if in_channels == 1:
        stem = nn.Sequential(_GreyToRGB(), *stem)
    elif in_channels != 3:
        raise ValueError(f"resnet expects 1 or 3 input channels, got {in_channels}")
    stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
    feature_dim = net.fc.in_features
    return EmbeddingNet(stages, feature_dim, embedding_dim,
                        stage_names=["stem", "layer1", "layer2", "layer3", "layer4"], **head)


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a .pth file, never unpickling arbitrary objects."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def resnet18(in_channels: int = 3, image_size: int = 224, embedding_dim: int = 512,
             pretrained: bool = False, **kw) -> EmbeddingNet:
    """torchvision ResNet-18, stages stem / layer1..4 (feature dim 512)."""
    return _torchvision_resnet(18, in_channels, embedding_dim, pretrained, **kw)


def resnet50(in_channels: int = 3, image_size: int = 224, embedding_dim: int = 512,
             pretrained: bool = False, **kw) -> EmbeddingNet:
    """torchvision ResNet-50, stages stem / layer1..4 (feature dim 2048)."""
    return _torchvision_resnet(50, in_channels, embedding_dim, pretrained, **kw)


MODELS: Registry[Callable[..., EmbeddingNet]] = Registry("model")
MODELS.register("small-cnn", small_cnn)
MODELS.register("resnet18", resnet18)
MODELS.register("resnet50", resnet50)


def list_models() -> list[str]:
    """The registered model names, in registration order."""
    return MODELS.names()


def model_params(name: str | None = None) -> dict:
    """The parameters (``model.params``) of model ``name`` with their defaults, or of every
    model as {name: {parameter: default}}: the constructor's and the embedding head's."""
    import inspect

    if name is None:
        return {n: model_params(n) for n in MODELS}
    name = MODELS.canonical(name)     # an unknown name raises ValueError listing the valid ones
    head = {k: p.default for k, p in inspect.signature(EmbeddingNet.__init__).parameters.items()
            if k in ("pool", "head_bn", "normalize", "bn_freeze")}
    own = {k: p.default for k, p in inspect.signature(MODELS[name]).parameters.items()
           if k not in ("in_channels", "image_size", "embedding_dim", "kw", "head")}
    if name.startswith("resnet"):
        own["weights_path"] = None
    return {**own, **head}


def build_model(name: str, in_channels: int, image_size: int, embedding_dim: int = 128,
                **params) -> EmbeddingNet:
    """Create a model by registry name; unknown names or parameters list the valid ones."""
    valid = set(model_params(name))
    ctor = MODELS[name]
    bad = sorted(set(params) - valid)
    if bad:
        raise ValueError(f"unknown parameter(s) {bad} for model {name!r}; valid: {sorted(valid)}")
    check_params(f"model {name!r}", params, model_params(name))
    return ctor(in_channels=in_channels, image_size=image_size, embedding_dim=embedding_dim,
                **params)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level part of an EmbeddingNet (stages by name, head) and the total."""
    counts: dict[str, int] = {}
    if isinstance(model, EmbeddingNet):
        for name, stage in zip(model.stage_names, model.stages):
            counts[name] = sum(p.numel() for p in stage.parameters())
        counts["head"] = sum(p.numel() for p in model.head.parameters())
        if model.head_bn is not None:
            counts["head"] += sum(p.numel() for p in model.head_bn.parameters())
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def describe_stages(model: EmbeddingNet, in_channels: int, image_size: int) -> list[dict]:
    """Shape of the representation at each stage (0 = input), for choosing a mixing stage."""
    x = torch.zeros(1, in_channels, image_size, image_size)
    out = [{"stage": 0, "name": "input", "shape": list(x.shape[1:])}]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, block in enumerate(model.stages, start=1):
            x = block(x)
            out.append({"stage": i, "name": model.stage_names[i - 1], "shape": list(x.shape[1:]),
                        "numel": int(math.prod(x.shape[1:]))})
    model.train(was_training)
    return out
