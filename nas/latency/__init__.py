"""Latency on the user's own device: real measurements, and a per-layer predictor validated against them.

``measure(spec)`` times ``nas.build_model(spec)``; ``load_predictor(space)`` builds (once) or loads the
layer table of a space for this device and predicts any member in microseconds; ``validate`` compares
the two on random architectures.
"""

from nas.latency._calibrate import DRIFT_BAND, Drift, calibrate
from nas.latency._measure import (
    Measurement,
    Sweeps,
    check_device,
    common_mode,
    measure,
    measure_module,
    median_of_rounds,
    num_threads,
    resolve_device,
    steady_allocator,
    time_beside_reference,
    time_call,
    time_interleaved,
    time_networks,
)
from nas.latency._predictor import (
    Fingerprint,
    Layer,
    Predictor,
    layers_of,
    load_predictor,
    load_table,
    profile,
    space_layers,
    table_path,
)
from nas.latency._validate import Validation, validate

__all__ = [
    "DRIFT_BAND", "Drift", "Fingerprint",
    "Layer",
    "Measurement",
    "Predictor",
    "Sweeps",
    "Validation",
    "calibrate",
    "check_device",
    "common_mode",
    "layers_of",
    "load_predictor",
    "load_table",
    "measure",
    "measure_module",
    "median_of_rounds",
    "num_threads",
    "profile",
    "resolve_device",
    "space_layers",
    "steady_allocator",
    "table_path",
    "time_beside_reference",
    "time_call",
    "time_interleaved",
    "time_networks",
    "validate",
]
