"""devices: the GPU memory counters in a process that has not initialised CUDA (checked on CPU by
standing in for torch.cuda), and the reproducibility record."""

import pytest
import torch

from llmprune import devices


def fake_cuda(monkeypatch, *, initialised: bool, count: int = 2, peaks=(0, 0)):
    """torch.cuda as a machine with ``count`` GPUs shows it; the allocator statistics raise, as torch's do,
    until CUDA is initialised. Returns the list of devices whose peak was reset."""
    reset = []

    def allocator(fn):
        def call(i):
            if not initialised:
                raise RuntimeError("Invalid device argument : did you call init?")
            return fn(i)
        return call

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", allocator(reset.append))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", allocator(lambda i: peaks[i]))
    return reset


def test_fresh_process_with_gpus_neither_resets_nor_reads_the_allocator(monkeypatch):
    reset = fake_cuda(monkeypatch, initialised=False)
    devices.reset_peak_memory()  # raised "Invalid device argument" before CUDA was initialised
    assert reset == []
    peak = devices.peak_memory_bytes()
    assert peak["gpu"] == 0 and peak["cpu"] > 0


def test_initialised_cuda_resets_and_sums_every_gpu(monkeypatch):
    reset = fake_cuda(monkeypatch, initialised=True, peaks=(5, 7))
    devices.reset_peak_memory()
    assert reset == [0, 1]
    assert devices.peak_memory_bytes()["gpu"] == 12


def test_no_gpu_reports_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices.reset_peak_memory()
    assert devices.peak_memory_bytes()["gpu"] is None


def test_cpu_record_names_what_decides_rounding():
    with devices.deterministic(torch.device("cpu")) as info:
        pass
    assert info["cpu_threads"] == torch.get_num_threads()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["blas"] and info["cpu_model"]  # e.g. "mkl", "Intel(R) Xeon(R) Processor"
    if torch.backends.mkldnn.is_available():
        assert info["onednn"].startswith("v")


def test_streamed_runs_fix_the_mmap_threshold_and_others_keep_buffers(monkeypatch):
    from llmprune import cli, devices

    calls = []
    monkeypatch.setattr(devices, "_mallopt", lambda *settings: calls.append(settings) or True)
    assert devices.bound_cpu_heap() and calls == [((devices.M_MMAP_THRESHOLD, 1 << 20),)]
    calls.clear()
    monkeypatch.setattr(cli, "run", lambda: 0)
    for argv, expected in ((["llmprune", "prune", "--stream-from-disk"], 1 << 20),
                           (["llmprune", "prune"], 32 << 20)):
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit):
            cli.main()
        assert dict(calls.pop())[devices.M_MMAP_THRESHOLD] == expected


def test_cpu_peak_is_this_process_image_high_water_mark():
    import subprocess
    import sys

    # a child forked from a parent that holds 400 MB: ru_maxrss would count the parent's pages, VmHWM does not
    code = ("import subprocess, sys; big = bytearray(400 << 20); big[::4096] = bytes(len(big[::4096]) * [1]); "
            "print(subprocess.run([sys.executable, '-c', 'from llmprune import devices; "
            "print(devices.peak_memory_bytes()[\"cpu\"])'], capture_output=True, text=True).stdout)")
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 50 << 20 < peak < 400 << 20  # ru_maxrss gave 431 MB here, VmHWM 233 MB
