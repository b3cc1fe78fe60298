"""Mixed precision for training: the network runs under autocast (bf16 or fp16), the losses
and the mixing of embeddings in fp32.

The losses compare embeddings through exponentials, log-sum-exps and small margins (Multi-
Similarity's exp(50 s), Proxy-Anchor's exp(32 s)), which half precision rounds badly, so the
network's output is upcast to fp32 before any loss sees it: :class:`AutocastModel` wraps the
model's entry points (``forward``, ``forward_to``, ``forward_from``, the ones the strategies
call), so a strategy that mixes inside the network (Metrix at the input or a feature map) gets
fp32 embeddings too while its feature maps stay in the lower precision.
"""

from __future__ import annotations

import torch
import torch.nn as nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastModel(nn.Module):
    """``model`` with its forward passes under autocast and its embeddings in fp32. Holds no
    parameters of its own (``model`` stays the module that is saved)."""

    def __init__(self, model: nn.Module, precision: str, device_type: str):
        super().__init__()
        self.inner = model
        self.dtype = DTYPES[precision]
        self.device_type = device_type

    def _autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.inner(x)
        return out.float()

    def forward_to(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        with self._autocast():
            return self.inner.forward_to(x, stage)

    def forward_from(self, h: torch.Tensor, stage: int) -> torch.Tensor:
        with self._autocast():
            out = self.inner.forward_from(h, stage)
        return out.float()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["inner"], name)


def for_training(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """The model as the training step calls it: itself in fp32, else autocast-wrapped."""
    if precision == "fp32":
        return model
    return AutocastModel(model, precision, device.type)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler for fp16 (whose small gradients underflow otherwise); disabled (a
    pass-through) for fp32 and bf16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def enable_tf32(device: torch.device, deterministic: bool) -> None:
    """TF32 matrix products on CUDA (Ampere and later), unless the run asks to be
    deterministic."""
    if device.type == "cuda" and not deterministic:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
