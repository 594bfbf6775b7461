"""ADM UNet (Dhariwal & Nichol 2021) with EDM preconditioning (Karras et al. 2022).

An independent implementation of NVlabs/edm's `DhariwalUNet` and `EDMPrecond` with the same
module, parameter and buffer names, so a state_dict of EDM's `EDMPrecond(model_type=
'DhariwalUNet')` (keys `model.enc.32x32_block1.conv0.weight`, ...) loads with `strict=True`.
Like EDM, weights stay fp32 and are cast to the activation dtype (fp16 only on CUDA); under an
outer autocast (the trainer's `train.precision` bf16/fp16) autocast's dtypes rule instead (`unet_dtypes`).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn.functional import silu

from eval.errors import UserError


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's unified initialiser: xavier/kaiming, uniform/normal."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"invalid init mode {mode!r}")


class Linear(nn.Module):
    """Fully-connected layer (`weight` [out, in], optional `bias`)."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal",
                 init_weight=1.0, init_bias=0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """Conv with optional 2x up/down resampling by a separable FIR filter.

    `kernel=0` gives a parameter-free resampler. The filter is a persistent buffer
    `resample_filter` (present only when up or down), as in EDM.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), init_mode="kaiming_normal", init_weight=1.0, init_bias=0.0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                    fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans)
                                    * init_weight) if kernel else None)
        self.bias = (nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if (up or down) else None)

    def forward(self, x):
        F = torch.nn.functional
        if self.resample_filter is not None:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            c = self.in_channels
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
            else:
                x = F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group norm with `min(num_groups, C // min_channels_per_group)` groups."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype),
                                              self.bias.to(x.dtype), self.eps)


def attention_weights(q, k):
    """softmax_k(q^T k / sqrt(c)) computed in fp32 and returned in q's dtype.

    Same values as EDM's `AttentionOp`, but plain autograd (so torch.func works).
    """
    scale = 1 / math.sqrt(k.shape[1])
    w = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k * scale).to(torch.float32))
    return w.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """Residual block (ADM/DDPM++ union) with optional resampling and self-attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False,
                 attention=False, num_heads=None, channels_per_head=64, dropout=0.0,
                 skip_scale=1.0, eps=1e-5, resample_filter=(1, 1), resample_proj=False,
                 adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.num_heads:
            # qkv channels are laid out as [head, channel, (q,k,v)], as in EDM.
            qkv = self.qkv(self.norm2(x))
            q, k, v = qkv.reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads,
                                  3, -1).unbind(2)
            a = torch.einsum("nqk,nck->ncq", attention_weights(q, k), v)
            x = (self.proj(a.reshape(*x.shape)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal noise embedding, `[cos, sin]` of `x * max_positions**(-i/(C/2))`."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class DhariwalUNet(nn.Module):
    """ADM UNet (Dhariwal & Nichol 2021) as re-implemented in EDM (Karras et al. 2022)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0):
        super().__init__()
        self.init_kwargs = dict(
            img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
            label_dim=label_dim, augment_dim=augment_dim, model_channels=model_channels,
            channel_mult=list(channel_mult), channel_mult_emb=channel_mult_emb,
            num_blocks=num_blocks, attn_resolutions=list(attn_resolutions), dropout=dropout,
            label_dropout=label_dropout)
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                     init=init, init_zero=init_zero)

        # Mapping network (noise, optional augmentation labels, class labels).
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder: every output is a skip connection.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block)
        skips = [b.out_channels for b in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        skips = []
        for blk in self.enc.values():
            x = blk(x, emb) if isinstance(blk, UNetBlock) else blk(x)
            skips.append(x)
        for blk in self.dec.values():
            if x.shape[1] != blk.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


def unet_dtypes(use_fp16: bool, force_fp32: bool, device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """(input dtype, output dtype) of `EDMPrecond`'s UNet call on a tensor of `device_type`.

    Without autocast on `device_type` (train.precision fp32, sampling): EDM's rule (NVlabs/edm
    training/networks.py `EDMPrecond.forward`), both float16 when `use_fp16`, not `force_fp32` and on
    CUDA, else float32. Under an autocast there (train.precision bf16/fp16, `tfd.trainer`): (float32,
    the autocast dtype): the input is not cast and autocast picks each op's dtype, the last conv
    returning the autocast dtype. EDM's own fp16 cast would fight a bf16 autocast (fp16 activations and
    weights rounded again to bf16 by each conv, a bf16 output failing EDM's float16 assertion).
    (`EDMPrecond` runs a `force_fp32` call with autocast disabled, so it gets (float32, float32).)"""
    if torch.is_autocast_enabled(device_type) and not force_fp32:
        return torch.float32, torch.get_autocast_dtype(device_type)
    dtype = torch.float16 if (use_fp16 and not force_fp32 and device_type == "cuda") else torch.float32
    return dtype, dtype


class EDMPrecond(nn.Module):
    """EDM preconditioning, Karras et al. 2022 Table 1: D(x) = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__()
        if model_type != "DhariwalUNet":
            raise UserError(f"model_type {model_type!r} is not supported (only 'DhariwalUNet')")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = DhariwalUNet(img_resolution=img_resolution, in_channels=img_channels,
                                  out_channels=img_channels, label_dim=label_dim, **model_kwargs)
        unet_kwargs = {k: v for k, v in self.model.init_kwargs.items()
                       if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")}
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels,
                                label_dim=label_dim, use_fp16=use_fp16, sigma_min=sigma_min,
                                sigma_max=sigma_max, sigma_data=sigma_data, model_type=model_type,
                                **unet_kwargs)

    def _inputs(self, x, sigma, class_labels):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    def raw(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """F(c_in x, c_noise, c) as float32, the network output before c_skip / c_out (Table 1)."""
        return self._raw(*self._inputs(x, sigma, class_labels), force_fp32, **model_kwargs)

    def _raw(self, x, sigma, class_labels, force_fp32=False, **model_kwargs):
        dev = x.device.type
        if force_fp32 and torch.is_autocast_enabled(dev):  # fp32 also under an outer autocast
            with torch.autocast(dev, enabled=False):
                return self._raw(x, sigma, class_labels, force_fp32, **model_kwargs)
        dtype, out_dtype = unet_dtypes(self.use_fp16, force_fp32, dev)
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                         **model_kwargs)
        assert F_x.dtype == out_dtype, (F_x.dtype, out_dtype)
        return F_x.to(torch.float32)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """D(x; sigma, c) = c_skip x + c_out F(c_in x, c_noise, c) (EDM Table 1); float32 [N, C, H, W]."""
        x, sigma, class_labels = self._inputs(x, sigma, class_labels)
        F_x = self._raw(x, sigma, class_labels, force_fp32, **model_kwargs)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        return c_skip * x + c_out * F_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def imagenet64_adm_kwargs() -> dict:
    """EDM's class-conditional ImageNet-64 ADM teacher (`edm-imagenet-64x64-cond-adm.pkl`)."""
    return dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, sigma_data=0.5,
                model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4],
                channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10,
                augment_dim=0)


def digits_unet_kwargs(**overrides) -> dict:
    """A small ADM UNet of the same family for 8x8 one-channel, 10-class digits (1.9M params).

    Attention needs >= 64 channels (one head per 64); a ~2.8x cheaper variant that keeps it:
    `digits_unet_kwargs(model_channels=16, channel_mult=[1, 2, 4], attn_resolutions=[2])`.
    """
    kwargs = dict(img_resolution=8, img_channels=1, label_dim=10, use_fp16=False, sigma_data=0.5,
                  model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2, 2],
                  channel_mult_emb=4, num_blocks=2, attn_resolutions=[4], dropout=0.0,
                  augment_dim=0)
    unknown = set(overrides) - set(kwargs) - {"sigma_min", "sigma_max", "label_dropout"}
    if unknown:
        raise TypeError(f"unknown digits UNet options: {sorted(unknown)}")
    kwargs.update(overrides)
    return kwargs


# ----------------------------------------------------------------------------------------------
# Layer names: the paper's zero-based `enc:i` / `dec:i` / `bottleneck`, or a raw module path.

def _unet_and_prefix(net: nn.Module) -> tuple[DhariwalUNet, str]:
    if isinstance(net, DhariwalUNet):
        return net, ""
    if isinstance(getattr(net, "model", None), DhariwalUNet):
        return net.model, "model."
    raise TypeError(f"expected EDMPrecond or DhariwalUNet, got {type(net).__name__}")


def resolve_layer(net: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Map `enc:6`, `dec:12`, `bottleneck` (last `enc` entry) or a module path to (path, module)."""
    unet, prefix = _unet_and_prefix(net)
    name = name.strip()
    m = re.fullmatch(r"(enc|dec):(\d+)", name)
    if m or name == "bottleneck":
        part = m[1] if m else "enc"
        keys = list(getattr(unet, part).keys())
        i = int(m[2]) if m else len(keys) - 1
        if i >= len(keys):
            raise UserError(f"layer {name!r} out of range: {part} has {len(keys)} entries (0..{len(keys) - 1})")
        return f"{prefix}{part}.{keys[i]}", getattr(unet, part)[keys[i]]
    if name:
        try:
            return name, net.get_submodule(name)
        except AttributeError:
            pass
    raise UserError(
        f"unknown layer {name!r}; use 'enc:I' (0..{len(unet.enc) - 1}), 'dec:I' "
        f"(0..{len(unet.dec) - 1}), 'bottleneck', or a module path like '{prefix}enc.{next(iter(unet.enc))}'")


def list_layers(net: nn.Module) -> list[str]:
    """All paper-style layer names with their module paths, e.g. `enc:6 = model.enc.32x32_block1`."""
    unet, prefix = _unet_and_prefix(net)
    out = [f"{part}:{i} = {prefix}{part}.{key}"
           for part in ("enc", "dec") for i, key in enumerate(getattr(unet, part).keys())]
    out.append(f"bottleneck = {prefix}enc.{list(unet.enc.keys())[-1]}")
    return out
