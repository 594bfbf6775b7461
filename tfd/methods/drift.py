"""Original Drifting idea without teacher features (the ablation motivating TFD): the same
drifting loss (and optional anchor-margin term, off by default) computed

- `space: pixel`: on the flattened images (one feature level, `pixel`);
- `space: randnet`: on the multi-scale features of a FIXED randomly initialised conv net
  (`RandomFeatureNet`, seeded by `randnet_seed`, never trained, rebuilt identically from the seed
  so it needs no checkpoint), each level average-pooled and flattened like TFD (`pool`).

The generator is a copy of the teacher run at sigma_max, as in TFD. The step is TFD's
(`tfd.methods.tfd.TFD.train_step`: groups of Ng generated / Np positives / Na anchors per class,
drifting loss per level, summed); only the feature map `teacher_features` is replaced.
`feature_noise` > 0 adds Gaussian noise to the images before the features (TFD's sigma
schedule); the default 0 uses clean images, as the original Drifting Model does.

RandomFeatureNet (chosen over a random copy of the teacher's UNet: cheaper, and independent of
the teacher's architecture): level 0 = SiLU(conv3x3(C -> w)); level l >= 1 =
SiLU(conv3x3 stride 2 (w 2^(l-1) -> w 2^l)); weights N(0, 2 / fan_in), zero bias. Layer names
`rand:0 .. rand:{levels-1}`; 8x8 digits with `pool: 2`: 8x8x32 -> 512-d, 4x4x64 -> 256-d,
2x2x128 -> 128-d.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from eval.errors import UserError
from tfd.methods import register
from tfd.methods.tfd import TFD, TFDParams, pooled


@dataclass
class DriftParams(TFDParams):
    space: Literal["pixel", "randnet"] = "pixel"
    layers: list[str] = field(default_factory=list)   # empty: every level of the space
    feature_noise: float = 0.0                        # clean features (see module docstring)
    lambda_anchor: float = 0.0
    randnet_width: int = 32
    randnet_levels: int = 3
    randnet_seed: int = 0


class RandomFeatureNet(nn.Module):
    """A fixed random conv net (see module docstring); `forward` returns the list of level outputs."""

    def __init__(self, in_channels: int, width: int = 32, levels: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        cin = in_channels
        for level in range(levels):
            cout = width * 2 ** level
            conv = nn.Conv2d(cin, cout, 3, stride=1 if level == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
            cin = cout
        self.requires_grad_(False).eval()

    def forward(self, x):
        out = []
        for conv in self.convs:
            x = F.silu(conv(x))
            out.append(x)
        return out


@register("drift")
class Drift(TFD):
    Params = DriftParams

    def __init__(self, teacher, data, params: DriftParams, device="cpu"):
        super().__init__(teacher, data, params, device)
        p = params
        if p.space == "pixel":
            valid = ["pixel"]
            self.randnet = None
        elif p.space == "randnet":
            valid = [f"rand:{i}" for i in range(p.randnet_levels)]
            self.randnet = RandomFeatureNet(teacher.sample_shape[0], p.randnet_width, p.randnet_levels,
                                            p.randnet_seed).to(device)
        else:
            raise UserError(f"space must be 'pixel' or 'randnet', got {p.space!r}")
        layers = list(p.layers) or valid
        bad = [name for name in layers if name not in valid]
        if bad:
            raise UserError(f"drift space {p.space!r}: unknown layers {bad} (valid: {valid})")
        self.params = dataclasses.replace(p, layers=layers)

    def teacher_features(self, x, xi, sigma_f, cond):
        """Pixel or random-network features of x + sigma_f xi (sigma_f = 0: clean); cond unused."""
        x = x + sigma_f.reshape(-1, *([1] * (x.ndim - 1))) * xi
        if self.randnet is None:
            return {"pixel": x.float().flatten(1)}
        hs = self.randnet(x.float())
        return {name: pooled(hs[int(name.split(":")[1])], self.params.pool) for name in self.params.layers}
