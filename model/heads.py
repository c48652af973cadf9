"""PUP-style (progressive upsampling) dense-prediction head, one per task; runs in float on the host.

Layout of heads.{task}.*: norm.weight|bias [D]; stages.{s}.conv.weight [Ch, Cin, 3, 3] (no bias,
BatchNorm follows); stages.{s}.bn.* [Ch]; out.weight [C_t, Ch, 1, 1], out.bias [C_t].
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class UpStage(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU -> 2x bilinear upsample."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class PUPHead(nn.Module):
    def __init__(self, cfg: ModelConfig, out_channels: int):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        chans = [cfg.dim] + [cfg.head_channels] * cfg.head_stages
        self.stages = nn.ModuleList(UpStage(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Conv2d(chans[-1], out_channels, kernel_size=1)

    def forward(self, tokens):
        """tokens [B, N+1, D] (class token first) -> [B, out_channels, img_h, img_w]."""
        c = self.cfg
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (c.num_tokens, c.dim):
            raise ValueError(f"PUPHead '{c.name}': tokens expected [B, N+1, D] = [B, {c.num_tokens}, "
                             f"{c.dim}], got {list(tokens.shape)}")
        B = tokens.shape[0]
        gh, gw = c.grid
        x = self.norm(tokens[:, 1:]).transpose(1, 2).reshape(B, c.dim, gh, gw)  # drop class token
        for stage in self.stages:
            x = stage(x)
        return self.out(x)
