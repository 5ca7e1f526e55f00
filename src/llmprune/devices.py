"""The only module that touches torch.cuda: device and dtype resolution, peak memory, CUDA streams and graphs."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import resource
import time
import warnings
from pathlib import Path

import torch

from .errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def use_gpu(index: int) -> torch.device:
    """Make GPU ``index`` this process's current CUDA device (one rank per GPU under torchrun)."""
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_device(spec: str = "auto") -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA GPU is visible on this machine; use --device cpu or --device auto")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device(spec)
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it (else fp16); on CPU bf16 only where it is native, else fp32."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if spec not in DTYPES:
        raise UsageError(f"--dtype must be auto, {', '.join(DTYPES)}, got {spec!r}")
    return DTYPES[spec]


@functools.lru_cache(maxsize=1)
def cpu_numerics() -> dict:
    """What decides CPU rounding besides torch's version and thread count: the processor, the kernel set
    torch dispatches to (``cpu_capability``, e.g. AVX512 or AVX2), and the BLAS and oneDNN it was built with.

    MKL and torch's vectorised kernels choose their code path by processor, so the same build can round
    differently on another CPU model (an AMD EPYC and an Intel Xeon do).
    """
    config = torch.__config__.show()

    def found(pattern: str) -> str | None:
        m = re.search(pattern, config)
        return m.group(1).strip() if m else None

    model = None
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = m.group(1).strip() if m else None
    return {"cpu_model": model or platform.processor() or None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "blas": found(r"BLAS_INFO=([^,\s]+)"),
            "mkl": found(r"Math Kernel Library Version ([^\s-]+)"),
            "onednn": found(r"MKL-DNN (v[\d.]+)") if torch.backends.mkldnn.is_available() else None}


@contextlib.contextmanager
def deterministic(device: torch.device):
    """Deterministic algorithms where torch has them, for the duration; yields a dict for the report.

    CPU: torch's kernels are deterministic for one build, thread count and processor model (all
    recorded, with the kernel set and BLAS that ``cpu_numerics`` reports). CUDA:
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` and cuDNN in deterministic mode;
    every operation that torch reports as having no deterministic implementation is listed under
    ``nondeterministic`` and ``deterministic`` is then False.
    """
    info: dict = {"device": device.type, "deterministic": True, "torch": torch.__version__,
                  "cpu_threads": torch.get_num_threads(), **cpu_numerics()}
    if device.type != "cuda":
        yield info
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield info
            finally:
                notes = sorted({str(w.message).splitlines()[0] for w in caught if "determinis" in str(w.message)})
                others = [w for w in caught if "determinis" not in str(w.message)]
        for w in others:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if notes:
            info["deterministic"] = False
            info["nondeterministic"] = notes
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def _cuda_in_use() -> bool:
    """True once this process has initialised CUDA. Before that no GPU memory was allocated, and torch's
    allocator statistics refuse every device (``RuntimeError: Invalid device argument``)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def start_cuda(device: torch.device) -> float:
    """Initialise CUDA for ``device`` now (driver context, allocator, cuBLAS: seconds on a large machine); its
    seconds, 0.0 off CUDA. Started before the model is read, it overlaps the kernel's read-ahead of the weights."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0.0
    start = time.perf_counter()
    with torch.cuda.device(device):
        x = torch.ones(8, 8, device=device)
        (x @ x).sum().item()
    return time.perf_counter() - start


def reset_peak_memory() -> None:
    """Start the GPUs' peak-memory counters afresh; nothing to do before CUDA is initialised."""
    if _cuda_in_use():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def _proc_kib(path: str, key: str) -> int | None:
    """A ``key: N kB`` field of a /proc file, in bytes; None where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_peak_bytes() -> int:
    """VmHWM of this process image; ``ru_maxrss`` where /proc is missing (it also counts, after an exec,
    the resident size of the process that forked this one)."""
    peak = _proc_kib("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory_bytes() -> dict[str, int | None]:
    """Peak resident memory of this process, and peak allocated GPU memory summed over GPUs (None: no GPU)."""
    cpu = _cpu_peak_bytes()
    gpu = None
    if _cuda_in_use():
        gpu = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    elif torch.cuda.is_available():
        gpu = 0  # CUDA never initialised: this process allocated nothing on a GPU
    return {"cpu": cpu, "gpu": gpu}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronize_cuda() -> None:
    """Wait for the current GPU's queued work (the ends of a timing); nothing to do without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def side_stream():
    """Run the body on a fresh CUDA stream, after the current stream's queued work and before its next:
    where the warm-up calls before a CUDA-graph capture run."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield stream
    torch.cuda.current_stream().wait_stream(stream)


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """The kernels ``fn()`` launches, captured as a CUDA graph; ``graph.replay()`` launches them again."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt; False where the C library has none."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(libc.mallopt(param, value) for param, value in settings)
    except (OSError, AttributeError):
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS.

    Block-sized activations are tens of MB; by default glibc maps and unmaps each one, and the
    kernel zeroes the pages again on every forward (seen as system time). Called by the CLI and
    benchmarks, never at import. Returns False where the C library has no mallopt.
    """
    return _mallopt((M_MMAP_THRESHOLD, 32 * 1024 * 1024),  # glibc's largest allowed value
                    (M_TRIM_THRESHOLD, 4 * 1024 * 1024 * 1024 - 1))


def bound_cpu_heap() -> bool:
    """Give every buffer of 1 MiB or more back to the OS when it is freed (a streamed run's memory stays flat).

    glibc raises its mmap threshold each time a mapped buffer is freed, so after the first blocks a
    block's tensors come from the heap, and the freed ones fragment it: a streamed run's resident
    memory then grew with every block. A fixed threshold turns that adjustment off. Called by the CLI
    for ``--stream-from-disk``, never at import.
    """
    return _mallopt((M_MMAP_THRESHOLD, 1024 * 1024))


def free_bytes(device: torch.device) -> int | None:
    """Memory this process may still allocate on ``device``: the GPU's free memory plus what torch holds
    unused, capped by ``torch.cuda.set_per_process_memory_fraction``. None for the CPU (see ``cpu_free_bytes``)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(index) if get_fraction is not None else 1.0
    cap = int(total * fraction) - torch.cuda.memory_allocated(index)
    return max(0, min(free + cached, cap))


def cpu_free_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    return _proc_kib("/proc/meminfo", "MemAvailable")

