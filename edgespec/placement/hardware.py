"""What this machine has: CPU cores, RAM, the GPUs llama.cpp can use, ONNX Runtime providers.

`detect_hardware()` probes once and returns a frozen `Hardware`. GPUs come from llama.cpp's own
device list (ggml's backend registry, bound here through ctypes: llama-cpp-python 0.3.36 exports the
functions from its bundled libggml but wraps none of them). When llama.cpp reports no GPU, `nvidia-smi`
is asked instead, so that `edgespec profile detect` can say "there is an NVIDIA GPU, but this llama.cpp
was built without CUDA". A probe that fails unexpectedly is recorded in `Hardware.notes`, never hidden.

The parsing of nvidia-smi's output and the assembly of llama.cpp's device list are pure functions
(`parse_nvidia_smi`, `gpus_from_llama`) so that tests can feed them machines they do not have.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

GpuSource = Literal["llama.cpp", "nvidia-smi"]
# What became of the nvidia-smi probe: it runs only when llama.cpp reports no GPU device.
NvidiaSmiState = Literal["not run", "not found", "ran", "failed"]

NVIDIA_SMI_QUERY = ["--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"]
NVIDIA_SMI_TIMEOUT_S = 10.0

# enum ggml_backend_dev_type in ggml-backend.h (CPU, GPU, IGPU, ACCEL, META: appended in this order).
DEVICE_KINDS = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
_MIB = 1 << 20


@dataclass(frozen=True)
class GpuDevice:
    """One GPU.

    Attributes:
        backend: the ggml backend that drives it ("CUDA", "Metal", "Vulkan", ...); "CUDA" for a GPU
            seen only by nvidia-smi.
        name: the device's description, e.g. "NVIDIA GeForce RTX 4060 Laptop GPU".
        total_mib, free_mib: its memory in MiB; None when the backend does not report it.
        source: who reported it: "llama.cpp" (usable for offloading) or "nvidia-smi" (present, but
            this llama.cpp build found no GPU).
        integrated: an integrated GPU sharing host memory (ggml's IGPU type).
        device: llama.cpp's device name ("CUDA0", "Vulkan1"), "" for nvidia-smi.
    """

    backend: str
    name: str
    total_mib: int | None
    free_mib: int | None
    source: GpuSource
    integrated: bool = False
    device: str = ""


@dataclass(frozen=True)
class LlamaDevice:
    """One entry of llama.cpp's (ggml's) device list, as read through ctypes."""

    name: str
    description: str
    backend: str
    kind: str  # one of DEVICE_KINDS' values, or "type N" for a type this code does not know
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Hardware:
    """The machine as `detect_hardware()` found it; fabricate one freely in tests.

    Attributes:
        cpu_model: CPU brand string, "unknown" when no probe gave one.
        physical_cores, logical_cores: core counts (psutil).
        total_ram_mib, available_ram_mib: system memory in MiB (psutil).
        llama_backends: ggml backends this llama.cpp has registered, e.g. ("CPU",) or ("CUDA", "CPU").
        gpu_offload: `llama_supports_gpu_offload()`: whether model layers can go to a GPU at all.
        gpus: GPU devices (see GpuDevice.source for who found them).
        onnx_providers: ONNX Runtime execution providers, () when onnxruntime is not installed.
        on_battery: True on battery, False on mains, None without a battery (or when unknown).
        nvidia_smi: what became of the nvidia-smi fallback.
        notes: probes that failed unexpectedly, as sentences.
    """

    cpu_model: str
    physical_cores: int
    logical_cores: int
    total_ram_mib: int
    available_ram_mib: int
    llama_backends: tuple[str, ...] = ("CPU",)
    gpu_offload: bool = False
    gpus: tuple[GpuDevice, ...] = ()
    onnx_providers: tuple[str, ...] = ()
    on_battery: bool | None = None
    nvidia_smi: NvidiaSmiState = "not run"
    notes: tuple[str, ...] = ()

    @property
    def usable_gpus(self) -> tuple[GpuDevice, ...]:
        """GPUs llama.cpp can offload layers to (found by llama.cpp itself, with offload support)."""
        if not self.gpu_offload:
            return ()
        return tuple(g for g in self.gpus if g.source == "llama.cpp")

    def best_gpu(self) -> tuple[int, GpuDevice] | None:
        """(index in `gpus`, device) of the usable GPU with the most free memory; None without one."""
        usable = [(i, g) for i, g in enumerate(self.gpus) if g in self.usable_gpus]
        if not usable:
            return None
        return max(usable, key=lambda item: -1 if item[1].free_mib is None else item[1].free_mib)

    def fingerprint(self) -> str:
        """A short, stable identifier of this machine for tuned profiles.

        CPU model, physical/logical cores, total RAM rounded to GiB and GPU names: what timings
        depend on, and nothing that changes from run to run (free memory, battery).
        """
        gpus = " + ".join(g.name for g in self.gpus) or "no GPU"
        ram_gib = round(self.total_ram_mib / 1024)
        return f"{self.cpu_model}; {self.physical_cores}c/{self.logical_cores}t; {ram_gib} GiB; {gpus}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, plus the fingerprint."""
        data = asdict(self)
        for key in ("llama_backends", "onnx_providers", "notes"):
            data[key] = list(data[key])
        data["gpus"] = [dict(g) for g in data["gpus"]]
        data["fingerprint"] = self.fingerprint()
        return data


def parse_nvidia_smi(output: str) -> tuple[list[GpuDevice], list[str]]:
    """Parse `nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits`.

    Args:
        output: its standard output: one line per GPU, e.g. "NVIDIA H100 80GB HBM3, 81559, 80000".
            Memory is in MiB; "[N/A]" (or any bracketed value) means not reported.

    Returns:
        (devices, notes): the GPUs, and one note per line that could not be parsed.
    """
    devices: list[GpuDevice] = []
    notes: list[str] = []
    for line in output.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.rsplit(",", 2)]  # a name may contain commas; numbers do not
        try:
            if len(fields) != 3 or not fields[0]:
                raise ValueError
            total, free = (_smi_mib(f) for f in fields[1:])
        except ValueError:
            notes.append(f"nvidia-smi: cannot parse the line {line.strip()!r}")
            continue
        devices.append(GpuDevice("CUDA", fields[0], total, free, "nvidia-smi"))
    return devices, notes


def _smi_mib(field: str) -> int | None:
    if field.startswith("[") and field.endswith("]"):  # [N/A], [Not Supported]
        return None
    return int(float(field))


def gpus_from_llama(devices: Iterable[LlamaDevice]) -> tuple[GpuDevice, ...]:
    """The GPUs (discrete and integrated) among llama.cpp's devices, with memory in MiB.

    CPU, accelerator (BLAS, AMX) and meta devices are left out. A device that reports 0 bytes of
    total memory does not know its memory: both figures become None.
    """
    gpus = []
    for dev in devices:
        if dev.kind not in ("GPU", "IGPU"):
            continue
        known = dev.total_bytes > 0
        gpus.append(
            GpuDevice(
                backend=dev.backend,
                name=dev.description or dev.name,
                total_mib=dev.total_bytes // _MIB if known else None,
                free_mib=dev.free_bytes // _MIB if known else None,
                source="llama.cpp",
                integrated=dev.kind == "IGPU",
                device=dev.name,
            )
        )
    return tuple(gpus)


def _ggml_libs() -> tuple[Any, Any]:
    """libggml (registry: device and backend lists) and libggml-base (device queries), as loaded by
    llama-cpp-python: the same library instances, so the same registry, as the models use."""
    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    ggml = load_shared_library("ggml", lib_dir)
    base = load_shared_library("ggml-base", lib_dir)
    size_t, ptr, text = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p
    for lib, fname, args, res in (
        (ggml, "ggml_backend_reg_count", [], size_t),
        (ggml, "ggml_backend_reg_get", [size_t], ptr),
        (ggml, "ggml_backend_dev_count", [], size_t),
        (ggml, "ggml_backend_dev_get", [size_t], ptr),
        (base, "ggml_backend_reg_name", [ptr], text),
        (base, "ggml_backend_dev_name", [ptr], text),
        (base, "ggml_backend_dev_description", [ptr], text),
        (base, "ggml_backend_dev_type", [ptr], ctypes.c_int),
        (base, "ggml_backend_dev_backend_reg", [ptr], ptr),
        (base, "ggml_backend_dev_memory", [ptr, ctypes.POINTER(size_t), ctypes.POINTER(size_t)], None),
    ):
        func = getattr(lib, fname)
        func.argtypes, func.restype = args, res
    return ggml, base


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace") if value else ""


def probe_llama() -> tuple[tuple[str, ...], list[LlamaDevice], bool]:
    """Ask the installed llama.cpp for its backends, its devices and whether it can offload to a GPU.

    Returns:
        (backend names in registration order, devices, llama_supports_gpu_offload()).
    """
    import llama_cpp

    # The project's quiet log sink: GPU backends log their initialisation to stderr otherwise.
    from edgespec.runtimes.llama_cpp import backend

    backend()
    ggml, base = _ggml_libs()
    backends = tuple(
        _text(base.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)))
        for i in range(ggml.ggml_backend_reg_count())
    )
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = base.ggml_backend_dev_backend_reg(dev)
        code = base.ggml_backend_dev_type(dev)
        devices.append(
            LlamaDevice(
                name=_text(base.ggml_backend_dev_name(dev)),
                description=_text(base.ggml_backend_dev_description(dev)),
                backend=_text(base.ggml_backend_reg_name(reg)) if reg else "",
                kind=DEVICE_KINDS.get(code, f"type {code}"),
                free_bytes=free.value,
                total_bytes=total.value,
            )
        )
    return backends, devices, bool(llama_cpp.llama_supports_gpu_offload())


def run_nvidia_smi() -> tuple[NvidiaSmiState, list[GpuDevice], list[str]]:
    """Run nvidia-smi (if it is on PATH) with a timeout: (state, devices, notes)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return "not found", [], []
    try:
        done = subprocess.run(
            [binary, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return "failed", [], [f"nvidia-smi failed: {exc}"]
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        reason = message[0] if message else "no message"
        return "failed", [], [f"nvidia-smi exited with code {done.returncode}: {reason}"]
    devices, notes = parse_nvidia_smi(done.stdout)
    return "ran", devices, notes


def _cpu_model(notes: list[str]) -> str:
    system = platform.system()
    try:
        if system == "Linux":
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                # x86: "model name"; some ARM kernels: "Model" or "Hardware".
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
        elif system == "Darwin":
            done = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        notes.append(f"cannot read the CPU model: {exc}")
    return platform.processor() or ""


def _battery(notes: list[str]) -> bool | None:
    import psutil

    sensors = getattr(psutil, "sensors_battery", None)
    if sensors is None:  # not implemented on this platform
        return None
    try:
        battery = sensors()
    except Exception as exc:  # a broken sensor must not stop detection; recorded, not hidden
        notes.append(f"cannot read the battery state: {type(exc).__name__}: {exc}")
        return None
    if battery is None or battery.power_plugged is None:
        return None
    return not battery.power_plugged


def _onnx_providers(notes: list[str]) -> tuple[str, ...]:
    try:
        import onnxruntime
    except ImportError:
        return ()
    try:
        return tuple(onnxruntime.get_available_providers())
    except Exception as exc:  # recorded, not hidden
        notes.append(f"onnxruntime is installed but lists no providers: {type(exc).__name__}: {exc}")
        return ()


def detect_hardware() -> Hardware:
    """Probe this machine (about half a second; a CUDA build also initialises the GPU driver)."""
    import psutil

    notes: list[str] = []
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False)
    if not physical:
        notes.append(f"psutil cannot count physical cores; using the {logical} logical ones")
        physical = logical
    memory = psutil.virtual_memory()

    backends: tuple[str, ...] = ()
    llama_devices: list[LlamaDevice] = []
    offload = False
    try:
        backends, llama_devices, offload = probe_llama()
    except Exception as exc:  # recorded, not hidden: `profile detect` shows it
        notes.append(f"cannot list llama.cpp's devices: {type(exc).__name__}: {exc}")
    if not backends and not notes:
        notes.append("llama.cpp has no backend registered (a GGML_BACKEND_DL build without its backends?)")
    gpus = gpus_from_llama(llama_devices)
    smi_state: NvidiaSmiState = "not run"
    if not gpus:
        smi_state, smi_gpus, smi_notes = run_nvidia_smi()
        gpus = tuple(smi_gpus)
        notes.extend(smi_notes)

    cpu = _cpu_model(notes)
    if not cpu:
        cpu = next((d.description for d in llama_devices if d.kind == "CPU" and d.description), "unknown")
    return Hardware(
        cpu_model=cpu,
        physical_cores=physical,
        logical_cores=logical,
        total_ram_mib=memory.total // _MIB,
        available_ram_mib=memory.available // _MIB,
        llama_backends=backends,
        gpu_offload=offload,
        gpus=gpus,
        onnx_providers=_onnx_providers(notes),
        on_battery=_battery(notes),
        nvidia_smi=smi_state,
        notes=tuple(notes),
    )
