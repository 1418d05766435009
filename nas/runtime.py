"""The runtimes a network is measured and deployed in: PyTorch eager, onnxruntime fp32, onnxruntime int8, and
ExecuTorch with its XNNPACK delegate (the phone path).

One function per step, shared by latency tables (every layer of a space), ``nas.latency.measure`` (whole networks)
and ``nas deploy`` (the file a user ships), so a table measures the very graph that deployment writes:
:func:`to_onnx` exports, :func:`quantize_int8` quantises it, :func:`session` opens it; :func:`to_pte` lowers to an
ExecuTorch program and :func:`pte_method` opens it; :class:`Compiled` gives a callable to time. onnx and onnxruntime
come with the ``deploy`` extra, executorch with the ``executorch`` extra; without them these raise one line naming
the pip command.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from nas._schema import SpecError, check_choice

Runtime = Literal["torch", "onnxruntime", "onnxruntime-int8", "executorch"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
# What each non-torch runtime imports, and the extra that installs it.
NEEDS = {"onnxruntime": ("deploy", ("onnx", "onnxruntime")), "onnxruntime-int8": ("deploy", ("onnx", "onnxruntime")),
         "executorch": ("executorch", ("executorch",))}
OPSET = 17  # HardSwish/HardSigmoid are native since 14; 17 is what onnxruntime's quantiser handles best
INPUT, OUTPUT = "input", "logits"
INT8_CALIBRATION_INPUTS = 4  # random inputs calibrating a layer's int8 graph: its latency does not depend on scales


def check_runtime(runtime: str, field: str = "runtime") -> None:
    check_choice(field, runtime, RUNTIMES)


def require(field: str = "runtime", runtime: str = "onnxruntime") -> None:
    """A SpecError at ``field`` unless ``runtime``'s packages are installed (its extra, see ``NEEDS``)."""
    if runtime not in NEEDS:
        return
    extra, modules = NEEDS[runtime]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise SpecError(field, f"needs {module}, which is not installed: pip install 'nas[{extra}]'") from None


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # The tracer warns about the shape checks that let the supernet share run_network; for a concrete network
    # they are constants, which is what tracing records.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def to_onnx(module: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True) -> bytes:
    """``module`` (eval mode) as an ONNX model, input ``input`` (N x C x H x W, N dynamic unless not
    ``dynamic_batch``), output ``logits``.

    This uses torch's TorchScript-based exporter (``dynamo=False``), deprecated but present in torch 2.14: it exports
    a layer in 0.05 s where the torch.export-based one takes 0.8 s (measured here on a compact block), and a
    latency table exports every layer of a space (880 for mobilenetv3_compact), so 45 s against 12 minutes.
    Deployment uses the same exporter, so a table measures the graph ``nas deploy`` ships. Outputs match PyTorch
    (``nas deploy`` checks each export on real images with onnxruntime)."""
    require("runtime", "onnxruntime")
    buffer = io.BytesIO()
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic_batch else None
    with _quiet_export(), torch.no_grad():
        try:
            torch.onnx.export(module.eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=axes)
        except TypeError as e:  # a torch without the TorchScript exporter
            raise SpecError("runtime", f"this torch ({torch.__version__}) cannot export ONNX with the "
                                       f"TorchScript exporter ({e})") from None
    return buffer.getvalue()


class Empty(nn.Module):
    """A graph that reads one value of its input: its time in a runtime is the cost of one call and of feeding it that
    input, without computing anything or returning a large output (``x + 0`` would add an elementwise pass, 10-20 us
    on a 224px feature map here, which layers in a network do not pay twice)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1] * 2


@contextlib.contextmanager
def _no_stderr() -> Iterator[None]:
    # ExecuTorch's C++ runtime logs to file descriptor 2 on start and on each thread-pool change (CPU-info probes,
    # "Resetting threadpool"): lines a user cannot act on, between a progress bar and a one-line error.
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def to_pte(module: nn.Module, example: torch.Tensor) -> bytes:
    """``module`` (eval mode) as an ExecuTorch program (``.pte``) for ``example``'s shape, every operator XNNPACK
    supports delegated to it (the CPU backend ExecuTorch ships for Android, iOS and Linux). The method is ``forward``.
    Lowering is ExecuTorch's own pipeline: torch.export, the edge dialect, XNNPACK partitioning; it takes 1-2 s a
    layer here, which a latency table pays once per layer."""
    require(runtime="executorch")
    # Importing it registers torchao's enums with torch's pytree, which logs a deprecation warning a user cannot act on.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with _quiet_export(), torch.no_grad():
        program = torch.export.export(module.eval(), (example,))
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def pte_method(program: bytes | Path, threads: int | None = None) -> Any:
    """The ``forward`` method of an ExecuTorch program, loaded in ExecuTorch's runtime, with its thread pool (one
    per process) at ``threads`` (default torch's current count, as for onnxruntime). Call ``.execute([x])``."""
    require(runtime="executorch")
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    n = threads or torch.get_num_threads()
    with _no_stderr():
        runtime = Runtime.get()
        if portable_lib._threadpool_get_thread_count() != n:  # the documented (if experimental) way to size it
            portable_lib._unsafe_reset_threadpool(n)
    source = program.read_bytes() if isinstance(program, Path) else program
    program = runtime.load_program(source)
    method = program.load_method("forward")
    # A Method does not keep its Program (which owns the bytes and the memory arenas) alive: once the Program is
    # collected, execute fails with error 0x10. The method holds it.
    method.program = program
    return method


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over float32 batches."""

    def __init__(self, name: str, batches: Iterable[np.ndarray]):
        self._feeds = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_int8(model: bytes, calibration: Iterable[np.ndarray]) -> bytes:
    """Static int8 quantisation of an ONNX model with onnxruntime's own tool: QDQ format (which onnxruntime fuses
    into int8 kernels), int8 weights per output channel, uint8 activations with ranges from ``calibration`` inputs
    (MinMax). Chosen over PyTorch's PT2E because the ONNX file is what ships: the int8 graph measured and checked is
    the deployed one, and onnxruntime runs it on every platform it supports. Activations are uint8 (U8S8), as
    onnxruntime advises for x86: int8 activations (S8S8) ran the compact reference in 1.56 ms here against 0.27 ms
    for U8S8 (one thread, batch 1)."""
    require("quantize", "onnxruntime")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)  # it logs a line per pre-processing step
    with tempfile.TemporaryDirectory(prefix="nas-int8-") as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(model)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # onnxruntime's recommended first step
        quantize_static(str(pre), str(out), _Reader(onnx.load(str(pre)).graph.input[0].name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        return out.read_bytes()


def session(model: bytes | str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (default: torch's current count, so a table's
    fingerprint means the same in both runtimes), one inter-op thread, all graph optimisations."""
    require("runtime", "onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    source = model.read_bytes() if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


class Compiled:
    """A module prepared for ``runtime`` once (its ONNX export, quantised for int8; its ExecuTorch program), then
    opened as a fresh callable on each :meth:`runner` call: a latency table visits every layer in several rounds,
    and exporting is the costly step."""

    def __init__(self, module: nn.Module, example: torch.Tensor, runtime: str, threads: int | None = None):
        check_runtime(runtime)
        self.runtime, self.threads, self.example = runtime, threads, example
        if runtime == "torch":
            self.module = module.eval()
            return
        if example.device.type != "cpu":
            raise SpecError("runtime", f"{runtime} runs on the CPU here; measure it with device cpu")
        self.module: nn.Module | None = module  # until prepared: the first runner, or prepare_all for many at once
        self._model: bytes | None = None

    @property
    def model(self) -> bytes:
        """The prepared program: ONNX (quantised for int8) or ExecuTorch bytes."""
        if self._model is None:
            prepare_all([self])
        assert self._model is not None
        return self._model

    def runner(self) -> Callable[[], object]:
        """A callable running the module once on the example input (in torch: call it under inference mode)."""
        if self.runtime == "torch":
            return functools.partial(self.module, self.example)
        if self.runtime == "executorch":
            return functools.partial(pte_method(self.model, self.threads).execute, [self.example])
        sess, feed = session(self.model, self.threads), {INPUT: self.example.numpy()}
        return functools.partial(sess.run, None, feed)


def _prepare(runtime: str, module: nn.Module, example: torch.Tensor) -> bytes:
    if runtime == "executorch":
        return to_pte(module, example)
    model = to_onnx(module, example, dynamic_batch=False)
    if runtime == "onnxruntime-int8":
        g = torch.Generator().manual_seed(0)
        model = quantize_int8(model, [torch.randn(example.shape, generator=g).numpy()
                                      for _ in range(INT8_CALIBRATION_INPUTS)])
    return model


def _prepare_alone(runtime: str, pickled: bytes) -> bytes:
    torch.set_num_threads(1)  # one worker per core: lowering is mostly single-threaded Python
    return _prepare(runtime, *pickle.loads(pickled))


PARALLEL_MIN = 16  # fewer programs than this are not worth a pool (a worker that spawns imports torch again, ~5 s)


def prepare_all(compiled: list[Compiled], progress: Callable[[], object] = lambda: None, *,
                workers: int | None = None) -> None:
    """Prepare every one of ``compiled`` not yet prepared, calling ``progress`` after each. ExecuTorch's lowering
    (1-2 s a layer, 880 layers for mobilenetv3_compact's table) runs in ``workers`` processes (default one per
    core): it is single-threaded Python, so a 2-core machine lowers a table in about half the time. Workers start
    as the platform's default does (fork on Linux), as torch's DataLoader workers do, so a script calling this needs
    no ``if __name__ == "__main__"`` guard there; each runs torch on one thread, which is what keeps a fork of a
    process whose thread pools have run from deadlocking. ONNX export (0.05 s a layer) stays here, where the pool's
    start-up would cost more than it saves."""
    # One network can stand at several places (a reference visited several times a round): prepared once.
    todo = list({id(c): c for c in compiled if c.runtime != "torch" and c._model is None}.values())
    for _ in range(len(compiled) - len(todo)):  # torch's, and the already prepared
        progress()
    workers = min(workers or len(os.sched_getaffinity(0)), len(todo))
    with contextlib.ExitStack() as stack:
        if workers >= 2 and len(todo) >= PARALLEL_MIN and todo[0].runtime == "executorch":
            pool = stack.enter_context(ProcessPoolExecutor(workers))
            # Pickled here, whole: the executor's own pickler would pass each tensor through shared memory, one file
            # descriptor per storage.
            jobs = [pool.submit(_prepare_alone, c.runtime, pickle.dumps((c.module, c.example))) for c in todo]
            models: Iterator[bytes] = (job.result() for job in jobs)
        else:
            models = (_prepare(c.runtime, c.module, c.example) for c in todo)
        for c, model in zip(todo, models, strict=True):
            c._model, c.module = model, None  # the program holds the weights; a table keeps hundreds of these
            progress()
