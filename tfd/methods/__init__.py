"""Method registry. A method owns its networks and losses; the shared trainer owns the rest.

Adding a method = one module defining a `Method` subclass with a `Params` dataclass, decorated
with `@register("name")`, one import line below, and one `runs:` block in config.yaml.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


@dataclass
class StepOutput:
    """What one `train_step` returns: a loss per trainable network (only those to update this
    step) and scalar metrics for `stats.jsonl`."""
    losses: dict[str, torch.Tensor]
    metrics: dict[str, float]


def input_sigma(params, generator) -> float:
    """The one-step generator's input noise level: `params.generator_sigma` when the method has
    one and it is set, else the generator denoiser's own `sigma_max` (EDM nets: 80)."""
    s = getattr(params, "generator_sigma", None)
    return float(s) if s is not None else float(generator.sigma_max)


def generator_input(params, generator) -> tuple[float, float]:
    """(sigma, scale) of the one-step generator's input `x = scale * z` at noise level sigma.

    `params.generator_timestep` t set (DMD2's SDXL "conditioning timestep", 399): sigma = the
    teacher's discrete sigma of t and scale = sqrt(sigma^2 + 1), so the network sees the raw noise
    z as its VP input at t, exactly as DMD2 feeds SDXL (notes/sdxl-adapter.md: G(z) = D(1.532 z;
    1.1606) at t = 399). Otherwise EDM's `x = s z` at s = `input_sigma` (scale = sigma)."""
    t = getattr(params, "generator_timestep", None)
    if t is not None:
        s = float(generator.timestep_sigma(int(t)))
        return s, math.sqrt(s * s + 1.0)
    s = input_sigma(params, generator)
    return s, s


class Method:
    """Base class. Subclasses set `Params` and implement the four methods below.

    `teacher` is a frozen `tfd.denoiser.Denoiser`; `data` draws real examples per condition
    (a `tfd.data.ConditionSampler`: `sample(G, k) -> (x [G, k, *sample_shape], cond [G])`,
    `random_conditions(n) -> cond [n]`, and `.generator`, which the trainer checkpoints).
    Networks are `Denoiser`s made with `teacher.copy()`, called through `.denoise` / `.features`
    with int64 condition ids; a method never reads raw network attributes.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    # Generator-loss add-ons (`runs.<run>.addons`, `tfd.addons.Addons`), set by `tfd.runs.build_method`
    # and applied by the trainer to the `generator` loss of every method; None: none.
    addons: Any = None

    def __init__(self, teacher, data, params, device="cpu"):
        self.teacher, self.data, self.params, self.device = teacher, data, params, device

    def networks(self) -> dict[str, torch.nn.Module]:
        """Trainable networks by name; each gets its own optimiser. `generator` (a `Denoiser`)
        is exported with its `save()`."""
        raise NotImplementedError

    def make_batch(self) -> Any:
        """Draw this step's real data (positives, anchors, conditions) from `self.data`, whose
        generator state the trainer checkpoints."""
        raise NotImplementedError

    def train_step(self, batch, step: int) -> StepOutput:
        raise NotImplementedError

    def generate(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The generator's differentiable one-step map from noise z `[B, *sample_shape]` and conditions
        `[B]` to samples in model space, as `sampler_for` runs it (before `decode`): default
        `x = G(a z; s, c)` with `(s, a) = generator_input`. Used by the add-ons (`tfd.addons`); a
        method whose one-step map differs (CD's consistency function) overrides it."""
        gen = self.networks()["generator"]
        s, a = generator_input(self.params, gen)
        return gen.denoise(z * a, s, cond)

    @classmethod
    def nfe(cls, params) -> int:
        """Generator calls per sample of `sampler_for` (the tables' `nfe` column unless the run sets
        `nfe:`); a few-step method returns its number of steps."""
        return 1

    @classmethod
    def sampler_for(cls, generator, params):
        """`sampler(cond, rnd)` for evaluation from an exported generator (a `Denoiser`); default:
        one step `x = D(a z; s, c)` with `(s, a) = generator_input(params, generator)`."""
        from tfd.sampling import one_step_sampler
        sigma, scale = generator_input(params, generator)
        return one_step_sampler(generator, sigma, scale=scale)


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r} (registered: {', '.join(sorted(METHODS))})")
    return METHODS[name]


# Registry lines: importing a module registers its method.
from tfd.methods import cd as _cd  # noqa: E402,F401
from tfd.methods import dmd as _dmd  # noqa: E402,F401
from tfd.methods import dmd2 as _dmd2  # noqa: E402,F401
from tfd.methods import dpdmd as _dpdmd  # noqa: E402,F401
from tfd.methods import drift as _drift  # noqa: E402,F401
from tfd.methods import tfd as _tfd  # noqa: E402,F401
