"""Device and precision resolution, done once per model and logged.

On CPU the right precision depends on the instruction set: bfloat16 and float16 matmuls are fast
only where the CPU has them natively (AVX512-BF16 / AMX-BF16, AVX512-FP16 / AMX-FP16); elsewhere
they are emulated and several times *slower* than float32. :func:`cpu_features` reads what the
CPU has (torch's dispatch level and the CPU's flags, both injectable), and ``dtype="auto"`` picks a
lower precision on CPU only where it is native there *and* this project measured it both faster
than float32 and within the agreement bound (:data:`CPU_AUTO_MEASUREMENTS`).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "CPU_AUTO_MEASUREMENTS",
    "CpuFeatures",
    "Measured",
    "Precision",
    "SlowPrecisionWarning",
    "auto_cpu_precision",
    "cpu_features",
    "resolve_device",
    "resolve_dtype",
    "resolve_precision",
    "warn_if_emulated",
]

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Pick the device to run on.

    ``"auto"`` (or ``None``) picks CUDA, then Apple MPS, then CPU. An explicit accelerator that is
    not available is an error, never a silent CPU fallback.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``.

    Returns:
        The resolved ``torch.device`` (CUDA devices always carry an index).

    Raises:
        ValueError: If the string is not a device name.
        RuntimeError: If the requested accelerator is not available on this machine.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
            ) from exc
    elif isinstance(device, torch.device):
        resolved = device
    else:
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")

    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r} was requested but CUDA is not available "
                "(no NVIDIA GPU, or torch was installed without CUDA support). "
                "Use device='cpu' or device='auto'."
            )
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={device!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    if resolved.type == "mps" and not _mps_available():
        raise RuntimeError(f"device={device!r} was requested but Apple MPS is not available on this machine")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device type {resolved.type!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return resolved


class SlowPrecisionWarning(UserWarning):
    """A precision was asked for that this CPU only emulates: expect it to be slower than float32."""


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for the engine's matmuls.

    Attributes:
        capability: torch's CPU dispatch level (``torch.backends.cpu.get_cpu_capability()``:
            ``"AVX2"``, ``"AVX512"``, ``"DEFAULT"``, ...). Capped dispatch (``ATEN_CPU_CAPABILITY``)
            counts: a CPU whose torch runs at AVX2 uses no AVX512 instruction.
        flags: The CPU's feature flags as ``/proc/cpuinfo`` spells them (``avx512_bf16``, ...).
    """

    capability: str
    flags: frozenset[str]

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        """AVX512 present and used by torch's kernels."""
        return "avx512f" in self.flags and self.capability.upper().startswith("AVX512")

    @property
    def avx512_vnni(self) -> bool:
        return self.avx512 and "avx512_vnni" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return self.avx512 and "avx512_bf16" in self.flags

    @property
    def amx(self) -> bool:
        return self.avx512 and "amx_tile" in self.flags

    @property
    def vnni(self) -> bool:
        """int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
        return self.avx512_vnni or "avx_vnni" in self.flags or (self.amx and "amx_int8" in self.flags)

    @property
    def native_bf16(self) -> bool:
        """bfloat16 matmuls run in hardware (AVX512-BF16 or AMX-BF16; Arm's BF16 extension)."""
        return self.avx512_bf16 or (self.amx and "amx_bf16" in self.flags) or "bf16" in self.flags

    @property
    def native_fp16(self) -> bool:
        """float16 matmuls run in hardware (AVX512-FP16 or AMX-FP16; Arm's FP16 arithmetic)."""
        x86 = self.avx512 and ("avx512_fp16" in self.flags or (self.amx and "amx_fp16" in self.flags))
        return x86 or "asimdhp" in self.flags

    @property
    def name(self) -> str:
        """The feature class used to look up measurements, e.g. ``"AVX512+VNNI+BF16"``."""
        if self.amx:
            return "AMX"
        if self.avx512:
            return "AVX512" + ("+VNNI" if self.avx512_vnni else "") + ("+BF16" if self.avx512_bf16 else "")
        if self.capability.upper() == "AVX2" or (self.avx2 and self.capability.upper() == "DEFAULT"):
            return "AVX2" + ("+VNNI" if "avx_vnni" in self.flags else "")
        return self.capability.upper() or "DEFAULT"

    def describe(self) -> str:
        """One line for logs and benchmark results."""
        have = [
            label
            for label, present in (
                ("AVX2", self.avx2),
                ("AVX512", self.avx512),
                ("AVX512-VNNI", self.avx512_vnni),
                ("AVX512-BF16", self.avx512_bf16),
                ("AMX", self.amx),
            )
            if present
        ]
        native = [d for d, ok in (("bf16", self.native_bf16), ("fp16", self.native_fp16)) if ok]
        return (
            f"torch CPU capability {self.capability}; {', '.join(have) or 'no AVX2'}; "
            f"native half precision: {', '.join(native) or 'none (bf16/fp16 emulated)'}"
        )


def _read_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def _this_cpu() -> CpuFeatures:
    return CpuFeatures(torch.backends.cpu.get_cpu_capability(), _read_cpu_flags())


def cpu_features(flags: Iterable[str] | None = None, capability: str | None = None) -> CpuFeatures:
    """What this CPU (or the given flags and dispatch level) offers.

    Args:
        flags: CPU feature flags as ``/proc/cpuinfo`` spells them; ``None`` reads this machine's.
        capability: torch's dispatch level; ``None`` asks this torch.

    Example:
        >>> cpu_features({"avx2", "fma"}, "AVX2").native_bf16
        False
    """
    if flags is None and capability is None:
        return _this_cpu()
    return CpuFeatures(
        capability if capability is not None else torch.backends.cpu.get_cpu_capability(),
        frozenset(flags) if flags is not None else _read_cpu_flags(),
    )


@dataclass(frozen=True)
class Measured:
    """One precision's side-by-side measurement against float32 on one CPU feature class.

    Attributes:
        speedup: Engine pairs/s over float32's (the slowest of the workloads measured).
        agrees: Within the agreement bound on every workload (Spearman >= 0.99 and top-3 100 %
            against float32).
        where: Which results file holds the measurement.
    """

    speedup: float
    agrees: bool
    where: str = ""

    @property
    def worth_it(self) -> bool:
        return self.speedup > 1.0 and self.agrees


#: Side-by-side engine measurements (precision -> feature class -> result) that ``dtype="auto"``
#: reads on CPU. A precision and CPU class not listed here was not measured, and auto keeps
#: float32 there (no real AVX2-only CPU has been measured by this project; with the dispatch
#: capped to AVX2, int8 ran 1.02-1.16x float32 on 7-bit weights and swapped W3's passages).
#:
#: AMD EPYC with AVX512-VNNI and AVX512-BF16 (2 threads): bfloat16 was 1.26-2.38x float32 and
#: agreed on the 6-layer 0.6B shape, but on the full 28-layer shape its Spearman against float32
#: was 0.943 on W2 (benchmarks/RESULTS.md), under the 0.99 bound. int8 (``backend.Int8Linear``:
#: 8-bit weights, activations in two int8 digits) measured 1.40-1.96x float32 on W1-W4 over six
#: full runs (20:29-21:15 UTC, 3 alternating rounds each, load average 1.0-1.9; 1.40 is kept),
#: Spearman 1.0 and top-3 100 % on W1-W4 with their own instructions, but 0.943 (top-3 67 %) on
#: W2 with the model card's default instruction, and one swap each in W3 (seed 1) and W2 (seed 2)
#: over five more text seeds, where bfloat16 swaps too. Neither is within the bound on every
#: workload, so auto keeps the exact float32 there: both stay one explicit ``dtype=`` away.
CPU_AUTO_MEASUREMENTS: dict[str, dict[str, Measured]] = {
    "bfloat16": {
        "AVX512+VNNI+BF16": Measured(1.26, False, "benchmarks/RESULTS-precision.md, benchmarks/RESULTS.md"),
    },
    "int8": {
        "AVX512+VNNI+BF16": Measured(1.40, False, "benchmarks/RESULTS-precision.md"),
    },
}

#: Order in which auto considers lower precisions on CPU.
_AUTO_CANDIDATES = ("int8", "bfloat16")


def auto_cpu_precision(
    features: CpuFeatures | None = None,
    measurements: Mapping[str, Mapping[str, Measured]] | None = None,
) -> str:
    """The precision ``dtype="auto"`` picks on this CPU: ``"float32"``, ``"bfloat16"`` or ``"int8"``.

    A lower precision is picked only where it is native on the CPU (bfloat16: AVX512-BF16 or AMX;
    int8: any x86 CPU with AVX2) *and* measured on that feature class both faster than float32 and
    within the agreement bound. Everything else keeps float32, the exact path.

    Args:
        features: The CPU (default: this one).
        measurements: Measured results (default: :data:`CPU_AUTO_MEASUREMENTS`).
    """
    features = features or cpu_features()
    table = CPU_AUTO_MEASUREMENTS if measurements is None else measurements
    for precision in _AUTO_CANDIDATES:
        native = features.native_bf16 if precision == "bfloat16" else features.avx2 or features.avx512
        result = table.get(precision, {}).get(features.name)
        if native and result is not None and result.worth_it:
            return precision
    return "float32"


@dataclass(frozen=True)
class Precision:
    """How the weights are held: a floating dtype, optionally with int8-quantized linear layers.

    Attributes:
        dtype: The floating dtype the checkpoint is loaded in.
        quantization: ``"int8"`` (dynamic int8 linear layers, float32 elsewhere) or ``None``.
    """

    dtype: torch.dtype
    quantization: str | None = None

    @property
    def name(self) -> str:
        """``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"int8"``."""
        return self.quantization or str(self.dtype).removeprefix("torch.")


_QUANTIZED = {"int8": "int8", "qint8": "int8"}


def resolve_precision(
    dtype: str | torch.dtype | None, device: torch.device, features: CpuFeatures | None = None
) -> Precision:
    """Pick the weights' precision for a device.

    ``"auto"``: bfloat16 on CUDA GPUs that support it, float16 on other CUDA GPUs and on MPS; on
    CPU :func:`auto_cpu_precision` (float32 unless a lower precision is native there and was
    measured faster and in agreement). ``"int8"`` is CPU only: float32 weights whose linear layers
    are quantized to int8 (the two-row head stays float32).

    Args:
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"int8"`` or a floating
            ``torch.dtype``.
        device: The resolved device.
        features: The CPU (default: this one), for ``"auto"`` on CPU.

    Raises:
        ValueError: For an unknown dtype name, a dtype that is not a floating type, or int8 off CPU.
    """
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if device.type == "mps":
            return Precision(torch.float16)
        return resolve_precision(auto_cpu_precision(features), device)
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type (or the string 'int8'), got {dtype}")
        return Precision(dtype)
    if isinstance(dtype, str) and dtype.lower() in _QUANTIZED:
        if device.type != "cpu":
            raise ValueError(
                f"dtype={dtype!r} is a CPU path (dynamic int8 linear layers); on {device.type} use "
                "'auto', 'bfloat16' or 'float16'"
            )
        return Precision(torch.float32, _QUANTIZED[dtype.lower()])
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return Precision(_DTYPES[dtype.lower()])
    raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16', 'float16' or 'int8', got {dtype!r}")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The floating dtype the weights are loaded in (see :func:`resolve_precision`).

    ``"int8"`` loads float32 weights (its linear layers are quantized after loading).

    Raises:
        ValueError: For an unknown dtype name or a dtype that is not a floating type.
    """
    return resolve_precision(dtype, device).dtype


def warn_if_emulated(precision: Precision, device: torch.device, features: CpuFeatures | None = None) -> bool:
    """Warn (``logging`` and :class:`SlowPrecisionWarning`) about a precision this CPU runs slowly.

    That is half precision the CPU emulates (no AVX512-BF16 / AMX for bfloat16, no AVX512-FP16 /
    AMX-FP16 for float16), and int8 without int8 dot-product instructions (VNNI or AMX), where
    the products take 7-bit weights and run at about float32's speed.

    Returns:
        Whether a warning was given.
    """
    if device.type != "cpu":
        return False
    features = features or cpu_features()
    if precision.quantization == "int8":
        if features.vnni:
            return False
        message = (
            f"dtype='int8' on a CPU without int8 dot-product instructions ({features.describe()}; "
            "it needs AVX512-VNNI, AVX-VNNI or AMX-INT8): int8 runs on 7-bit weights here, "
            "measured only 1.02-1.16x float32 with AVX2 kernels and further from it (max "
            "|Δlogit| 0.13, one rank swap on W3; benchmarks/RESULTS-precision-emulated-avx2.md); "
            "use dtype='float32' (exact)"
        )
    elif precision.dtype in (torch.bfloat16, torch.float16):
        name = precision.name
        native = features.native_bf16 if precision.dtype == torch.bfloat16 else features.native_fp16
        if native:
            return False
        needs = "AVX512-BF16 or AMX" if precision.dtype == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
        better = "dtype='float32' (exact)" + (
            " or dtype='int8' (faster, approximate)" if features.vnni else ""
        )
        message = (
            f"dtype={name!r} on a CPU without native {name} ({features.describe()}; it needs {needs}): "
            f"{name} is emulated here and expected to be several times SLOWER than float32 (measured: "
            f"the engine 4.5x slower in bf16 on an AVX2-only EPYC); use {better}"
        )
    else:
        return False
    logger.warning(message)
    warnings.warn(message, SlowPrecisionWarning, stacklevel=3)
    return True
