"""Hardware detection: the pure parsers on fabricated data, and one real probe of this machine."""

from __future__ import annotations

import pytest

from edgespec.placement import hardware
from edgespec.placement.hardware import GpuDevice, Hardware, LlamaDevice, gpus_from_llama, parse_nvidia_smi

MIB = 1 << 20


def test_parse_nvidia_smi_reads_each_gpu_and_notes_a_malformed_line():
    output = (
        "NVIDIA H100 80GB HBM3, 81559, 80000\n"
        "\n"
        "NVIDIA GeForce RTX 3060, Laptop GPU, 6144, [N/A]\n"  # a comma in the name
        "garbage without fields\n"
        "Tesla T4, lots, 15000\n"
    )
    devices, notes = parse_nvidia_smi(output)
    assert devices == [
        GpuDevice("CUDA", "NVIDIA H100 80GB HBM3", 81559, 80000, "nvidia-smi"),
        GpuDevice("CUDA", "NVIDIA GeForce RTX 3060, Laptop GPU", 6144, None, "nvidia-smi"),
    ]
    assert len(notes) == 2
    assert "garbage without fields" in notes[0] and "Tesla T4, lots, 15000" in notes[1]
    assert parse_nvidia_smi("") == ([], [])


def test_gpus_from_llama_keeps_gpus_in_mib_and_drops_cpu_and_accelerators():
    devices = [
        LlamaDevice("CPU", "AMD Ryzen 7 7840U", "CPU", "CPU", 30 << 30, 32 << 30),
        LlamaDevice("BLAS", "OpenBLAS", "BLAS", "ACCEL", 0, 0),
        LlamaDevice("CUDA0", "NVIDIA GeForce RTX 4060 Laptop GPU", "CUDA", "GPU", 7000 * MIB + 5, 8188 * MIB),
        LlamaDevice("Vulkan0", "AMD Radeon 780M", "Vulkan", "IGPU", 0, 0),
        LlamaDevice("X0", "", "X", "type 9", 1, 1),
    ]
    assert gpus_from_llama(devices) == (
        GpuDevice(
            "CUDA",
            "NVIDIA GeForce RTX 4060 Laptop GPU",
            8188,
            7000,
            "llama.cpp",
            integrated=False,
            device="CUDA0",
        ),
        GpuDevice("Vulkan", "AMD Radeon 780M", None, None, "llama.cpp", integrated=True, device="Vulkan0"),
    )


def _machine(**changes) -> Hardware:
    base = dict(
        cpu_model="Test CPU",
        physical_cores=8,
        logical_cores=16,
        total_ram_mib=32_000,
        available_ram_mib=20_000,
    )
    base.update(changes)
    return Hardware(**base)


def test_usable_gpus_need_offload_and_llama_cpp_as_the_source():
    smi = GpuDevice("CUDA", "RTX", 8000, 7000, "nvidia-smi")
    small = GpuDevice("CUDA", "small", 4000, 1000, "llama.cpp")
    big = GpuDevice("CUDA", "big", 24000, 20000, "llama.cpp")
    assert _machine(gpus=(smi,), gpu_offload=True).best_gpu() is None
    assert _machine(gpus=(small, big), gpu_offload=False).usable_gpus == ()
    assert _machine(gpus=(small, big), gpu_offload=True).best_gpu() == (1, big)


def test_fingerprint_is_stable_and_ignores_free_memory():
    gpu = GpuDevice("CUDA", "NVIDIA H100", 80000, 78000, "llama.cpp")
    one = _machine(gpus=(gpu,), gpu_offload=True, total_ram_mib=32_100)
    other = _machine(
        gpus=(GpuDevice("CUDA", "NVIDIA H100", 80000, 100, "llama.cpp"),),
        gpu_offload=True,
        total_ram_mib=32_000,
        available_ram_mib=1,
        on_battery=True,
    )
    assert one.fingerprint() == other.fingerprint() == "Test CPU; 8c/16t; 31 GiB; NVIDIA H100"
    assert _machine().fingerprint().endswith("; no GPU")
    data = one.to_dict()
    assert data["gpus"][0]["name"] == "NVIDIA H100" and data["fingerprint"] == one.fingerprint()


def test_nvidia_smi_absent_is_not_an_error(monkeypatch):
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    assert hardware.run_nvidia_smi() == ("not found", [], [])


def test_a_failing_probe_is_recorded_in_notes(monkeypatch):
    def broken():
        raise OSError("libggml.so: cannot open shared object file")

    monkeypatch.setattr(hardware, "probe_llama", broken)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    hw = hardware.detect_hardware()
    assert any("cannot list llama.cpp's devices" in note and "libggml.so" in note for note in hw.notes)
    assert hw.llama_backends == () and hw.gpus == ()


@pytest.fixture(scope="module")
def this_machine() -> Hardware:
    return hardware.detect_hardware()


def test_detect_hardware_on_this_machine(this_machine):
    hw = this_machine
    assert hw.physical_cores >= 1 and hw.logical_cores >= hw.physical_cores
    assert hw.total_ram_mib > 0 and 0 < hw.available_ram_mib <= hw.total_ram_mib
    assert "CPU" in hw.llama_backends
    assert hw.cpu_model and hw.cpu_model != "unknown"
    assert isinstance(hw.gpu_offload, bool)
    assert all(g.source in ("llama.cpp", "nvidia-smi") for g in hw.gpus)
    assert hw.on_battery in (None, True, False)
    assert not hw.notes, hw.notes
