"""Parameter lists to benchmark the LAWA history (Kaddour 2022, arXiv:2209.14981) on.

The real models are plain torch modules with the shapes and tensor counts of the
models the paper trains (ResNet-50: 161 tensors, 25.6M elements) and of GPT-2 small
(148 tensors, 124.4M elements, the LM head tied to the token embedding). They are
built on the meta device and then filled with random numbers: no download, no init
cost beyond one pass over memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Workload:
    """A named list of parameters."""

    name: str
    params: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )


def resnet50() -> nn.Module:
    """ResNet-50 (He et al. 2016): stages of 3, 4, 6, 3 bottlenecks, 1000 classes."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(_Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    layers.append(nn.Linear(cin, 1000))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln_2, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


def gpt2_small() -> nn.Module:
    """GPT-2 small (Radford et al. 2019): 12 blocks of width 768, 50257 tokens, 1024 positions."""
    d = 768
    return nn.ModuleDict({
        "wte": nn.Embedding(50257, d),
        "wpe": nn.Embedding(1024, d),
        "h": nn.ModuleList(_Block(d) for _ in range(12)),
        "ln_f": nn.LayerNorm(d),
    })


MODELS = {"resnet50": resnet50, "gpt2-small": gpt2_small}


def model_params(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Workload:
    """The parameters of model ``name`` (a key of ``MODELS``), random normal weights."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    with torch.device("meta"):
        model = MODELS[name]()
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(seed)
    params = [p.detach().normal_(generator=g) for p in model.parameters()]
    return Workload(name, params)


def flat_params(numel: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Workload:
    """One tensor of ``numel`` elements: the launch-free best case."""
    g = torch.Generator(device).manual_seed(seed)
    return Workload(f"flat-{numel >> 20}M" if numel >= 1 << 20 else f"flat-{numel}",
                    [torch.empty(numel, dtype=dtype, device=device).normal_(generator=g)])
