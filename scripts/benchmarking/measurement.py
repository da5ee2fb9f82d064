"""Timing, memory, numerical checks and the machine: what every benchmark script measures with."""

import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

GIB = 2**30
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 1e-2
# In bf16 our error against an fp32 run may also be up to this multiple of the reference's own.
BF16_REFERENCE_FACTOR = 1.5
AUTOCAST_LOSS_TOLERANCE = 1e-2


def log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


@dataclass
class Variant:
    name: str
    description: str
    run: Callable[[], object]
    resident: Callable[[], int]  # bytes the variant keeps between calls (weights, grads, optimizer)


def timed_call(variant: Variant, device: torch.device):
    """(seconds, peak bytes or None): wall time after a synchronize; on CUDA the variant's own peak memory."""
    if device.type != "cuda":
        start = time.perf_counter()
        variant.run()
        return time.perf_counter() - start, None
    torch.cuda.synchronize(device)
    resident, before = variant.resident(), torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    variant.run()
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return elapsed, resident + torch.cuda.max_memory_allocated(device) - before


def measure(variants: List[Variant], device: torch.device, warmup: int, repeats: int) -> Dict[str, dict]:
    """Warm up, then time every variant once per repeat, interleaved; medians in ms."""
    for _ in range(warmup):
        for variant in variants:
            variant.run()
    times = {v.name: [] for v in variants}
    peaks = {v.name: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            seconds, peak = timed_call(variant, device)
            times[variant.name].append(1e3 * seconds)
            peaks[variant.name].append(peak)
    return {
        v.name: {
            "description": v.description,
            "median_ms": statistics.median(times[v.name]),
            "times_ms": times[v.name],
            "peak_gib": None if device.type != "cuda" else max(peaks[v.name]) / GIB,
        }
        for v in variants
    }


def add_ratios(results: Dict[str, dict], pairs: Dict[str, tuple]) -> None:
    """pairs: variant -> (reference or None, nnU-Net baseline or None).

    speedup_vs_reference = reference ms / variant ms; cost_vs_nnunet = variant ms / nnU-Net ms.
    """
    for name, (reference, baseline) in pairs.items():
        ms = results[name]["median_ms"]
        if reference:
            results[name]["speedup_vs_reference"] = results[reference]["median_ms"] / ms
        if baseline:
            results[name]["cost_vs_nnunet"] = ms / results[baseline]["median_ms"]


def resident_bytes(module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def weights_restored(*modules: nn.Module):
    """Undo what training steps did to the modules' weights, so that every row starts from the same ones."""
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    try:
        yield
    finally:
        for module, state in zip(modules, saved):
            module.load_state_dict(state)
            module.zero_grad(set_to_none=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return name if dtype == torch.float32 else f"{name} autocast"


def encoder_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on CUDA, as in the authors' measurement; fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def nnunet_dtype(device: torch.device) -> torch.dtype:
    """What nnU-Net's trainer and predictor run in: torch.autocast("cuda")'s default, fp32 on a CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


@contextmanager
def ieee_fp32():
    """Plain fp32 for the error checks: no TF32 in matmuls or cuDNN convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved



def resident_peak_bytes() -> int:
    """This process's peak resident set size (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_resident_peak() -> int:
    """Reset the peak RSS to the current RSS (Linux clear_refs) and return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return resident_peak_bytes()


def machine_info(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, gpu_memory_gib=properties.total_memory / GIB,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["device_name"] = info["cpu"]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
