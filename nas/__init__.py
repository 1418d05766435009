"""nas: hardware-aware neural architecture search over MobileNetV2/V3-style networks."""

from nas._schema import SpecError
from nas.model import build_model, from_torchvision
from nas.space import SearchSpace, load_space
from nas.spec import NetworkSpec, load_spec, save_spec
from nas.supernet import Supernet

__all__ = ["NetworkSpec", "SearchSpace", "SpecError", "Supernet", "build_model", "from_torchvision", "load_space",
           "load_spec", "save_spec"]
