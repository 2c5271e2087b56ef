"""What every benchmark prints above its table: date, machine, package versions."""

from __future__ import annotations

import datetime
import os
import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "megatron-core", "transformers", "transformer-engine", "numpy", "sentencepiece")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    except ImportError:
        pass
    return None


def package_versions(packages=PACKAGES) -> str:
    found = []
    for pkg in packages:
        try:
            found.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def environment_lines() -> list[str]:
    gpu = gpu_name()
    return [
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}" + (f"; GPU: {gpu}" if gpu else ""),
        f"packages: {package_versions()}",
    ]
