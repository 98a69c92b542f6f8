"""Builds the CPU harness of the Metal kernels (metal/harness) and runs calibra._metal's launches on it."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "metal-harness"


def build(build_dir: Path = BUILD, sanitize: str = "") -> Path:
    """Configure and build the harness library; returns its path. Raises RuntimeError with the reason."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed")
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        raise RuntimeError("no C++ compiler")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = [
        "cmake",
        "-S",
        str(ROOT / "metal" / "harness"),
        "-B",
        str(build_dir),
        *gen,
        f"-DCALIBRA_METAL_SANITIZE={sanitize}",
    ]
    for cmd in (cfg, ["cmake", "--build", str(build_dir), "-j2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    lib = build_dir / "libcalibra_metal_harness.so"
    if not lib.is_file():
        raise RuntimeError(f"the build did not produce {lib}")
    return lib


class HarnessExecutor:
    """Runs a calibra._metal.Launch on the CPU: same kernel source, same buffers, same grid."""

    def __init__(self, lib_path: Path, skew_us: int = 0) -> None:
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.mh_launch.restype = ctypes.c_int
        self.lib.mh_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            *[ctypes.c_uint] * 7,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self.lib.mh_kernel_count.restype = ctypes.c_int
        self.skew_us = skew_us
        self.kernels: list[str] = []  # every kernel launched, for coverage checks

    def run(self, launch) -> None:
        for b in launch.buffers:
            if b.device.type != "cpu" or not b.is_contiguous():
                raise ValueError(f"[harness] {launch.kernel}: buffers must be contiguous CPU tensors")
        record = os.environ.get("CALIBRA_METAL_HARNESS_RECORD")
        before = [_raw(b) for b in launch.buffers] if record else None
        ptrs = (ctypes.c_void_p * len(launch.buffers))(*[b.data_ptr() for b in launch.buffers])
        err = ctypes.create_string_buffer(512)
        rc = self.lib.mh_launch(
            launch.kernel.encode(),
            ptrs,
            len(launch.buffers),
            *launch.groups,
            *launch.threads,
            self.skew_us,
            err,
            len(err),
        )
        if rc:
            raise RuntimeError(f"[harness] {launch.kernel}: {err.value.decode()}")
        self.kernels.append(launch.kernel)
        if record:
            _record(Path(record), launch, before, [_raw(b) for b in launch.buffers])


def _raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _record(folder: Path, launch, before: list, after: list) -> None:
    """One launch as a replay file for metal_harness_replay (the TSan lane): a text header
    ``kernel gx gy gz tx ty tz nbuf``, then per buffer ``size`` and its bytes before and after."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("*.launch")))
    with open(folder / f"{n:05d}.launch", "wb") as f:
        f.write(f"{launch.kernel} {' '.join(map(str, (*launch.groups, *launch.threads)))} {len(before)}\n".encode())
        for b, a in zip(before, after):
            f.write(f"{len(b)}\n".encode())
            f.write(b)
            f.write(a)
