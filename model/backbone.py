"""A compact residual CNN for single-channel radiographs, in plain torch.

Layout: a strided single-channel stem (two stride-2 convolutions, so a 256 px input is at 64 px
before the first stage), then residual stages whose first block halves the resolution.
No pretrained weights exist for it; it is trained from scratch.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBnAct(nn.Sequential):
    """Convolution, batch norm, SiLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.SiLU(inplace=True),
        )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or strided 1x1) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBnAct(in_ch, out_ch, 3, stride)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResidualBackbone(nn.Module):
    """Stem plus residual stages; ``forward`` returns the last feature map (B, C, h, w).

    Parameters
    ----------
    in_chans : number of input channels (1 for radiographs).
    stem_channels : width of the stem.
    stage_channels, stage_depths : width and number of blocks of each stage; every stage after
        the first starts with a stride-2 block.
    """

    def __init__(
        self,
        in_chans: int = 1,
        stem_channels: int = 24,
        stage_channels: tuple[int, ...] = (32, 64, 128, 192),
        stage_depths: tuple[int, ...] = (1, 1, 2, 1),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvBnAct(in_chans, stem_channels, 5, 2),
            ConvBnAct(stem_channels, stem_channels, 3, 2),
        )
        stages: list[nn.Module] = []
        prev = stem_channels
        for i, (ch, depth) in enumerate(zip(stage_channels, stage_depths, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(prev, ch, stride))
                prev = ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
