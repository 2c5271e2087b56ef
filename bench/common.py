"""What every benchmark prints above its table: date, machine, package versions."""

from __future__ import annotations

import datetime
import os
import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "megatron-core", "transformers", "transformer-engine", "numpy", "sentencepiece",
            "safetensors")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


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
        f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {memory_gib():.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}" + (f"; GPU: {gpu}" if gpu else ""),
        f"packages: {package_versions()}",
    ]


def hf_qwen3_moe(preset, experts_implementation: str | None = None, router_aux_loss_coef=1e-3):
    """transformers' `Qwen3MoeForCausalLM` with exactly the config our export writes for
    `preset`, returning its load-balancing loss as ours does (`output_router_logits`)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_ext.convert.hf_config import hf_config_dict

    fields = hf_config_dict(preset, router_aux_loss_coef=router_aux_loss_coef)
    config = Qwen3MoeConfig(**{**fields, "output_router_logits": True})
    if experts_implementation:
        config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config)
