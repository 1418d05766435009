"""nas: hardware-aware neural architecture search over MobileNetV3-style networks."""

from nas._schema import SpecError
from nas.model import build_model
from nas.spec import NetworkSpec, load_spec, save_spec

__all__ = ["NetworkSpec", "SpecError", "build_model", "load_spec", "save_spec"]
