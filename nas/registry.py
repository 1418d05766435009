"""The one registry of per-block choices: activations by name, and kernel sizes.

Spec and space validation, the builder and the supernet (one block implementation), the latency table,
the largest/smallest members of a space, reports and the test strategies all derive from these. Adding
an activation or a kernel size is one entry here plus its tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any

from torch import nn

from nas._schema import OneOf


@dataclass(frozen=True)
class ActivationChoice:
    name: str  # as written in specs and spaces
    module: type[nn.Module]  # torch's module, constructed with inplace=True as torchvision does
    label: str  # short label for reports and plots
    cost: int  # order from cheapest to dearest: a space's smallest member takes the first, its largest the last


ACTIVATIONS: dict[str, ActivationChoice] = {a.name: a for a in (
    ActivationChoice("relu", nn.ReLU, "RE", 0),
    ActivationChoice("relu6", nn.ReLU6, "R6", 1),  # MobileNetV2 (Sandler et al. 2018, sec. 3.3)
    ActivationChoice("hswish", nn.Hardswish, "HS", 2),  # MobileNetV3 (Howard et al. 2019, sec. 5.2)
)}
BLOCK_KERNELS = (3, 5, 7)  # depthwise kernels of an inverted residual
STEM_KERNELS = (1, 3, 5, 7)

# Field types for the typed descriptions (nas._schema checks them, listing the allowed values on error).
Activation = Annotated[str, OneOf(tuple(ACTIVATIONS))]
BlockKernel = Annotated[int, OneOf(BLOCK_KERNELS)]
StemKernel = Annotated[int, OneOf(STEM_KERNELS)]


@functools.cache
def activation(name: str) -> nn.Module:
    """One shared, stateless module per activation name: blocks apply it by name, since in a supernet the
    activation of a block is a per-call choice, not a fixed module."""
    return ACTIVATIONS[name].module(inplace=True)


def cost_order(value: Any) -> Any:
    """Sort key from cheapest to dearest option of any choice: activations by their cost, numbers (kernels,
    widths, depths, expansions) and SE off/on by value."""
    return ACTIVATIONS[value].cost if isinstance(value, str) else value
