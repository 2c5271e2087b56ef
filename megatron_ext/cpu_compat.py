"""Every CPU-only adaptation of Megatron-Core, in one place.

Megatron-Core (0.16) assumes CUDA in a handful of places. On a machine without a GPU,
`enable()` installs the shims below; each comment names the Megatron-Core line it covers.
On a GPU none of this runs: `mcore_fixes.install()` (the one entry, called by
`parallel.init_distributed`) calls `enable()` only when CUDA is absent, so the GPU path is
Megatron-Core untouched by this module.

Fixes of Megatron-Core bugs that a GPU without TransformerEngine/apex meets too are not here:
they live in `mcore_fixes.py`, each installed on its own condition whatever the device
(formerly shims 5 and 11 of this module: the missing `te_general_gemm` name, and the
distributed optimizer's torch-Adam 'step' handling on load).

The shims, in short:
  1. a TorchFunctionMode that sends `device="cuda"` / `.cuda()` to the CPU,
  2. `torch.cuda.current_device()` and friends answer for the CPU,
  3. no-op CUDA streams and events,
  4. a CPU model-parallel RNG tracker,
  6. gloo-friendly all-to-all split sizes (gloo rejects tensor split sizes),
  7. grad clipping without its `torch.cuda.FloatTensor` type assertion,
  8. an accurate grad-norm kernel (the local fallback's fp32 `torch.norm` is not, on CPU),
  9. all-gather of unequal pieces over gloo (needed for expert tensor parallelism),
 10. the optimizers' parameter type checks accept CPU tensors (distributed, bf16).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# 1. device="cuda" -> CPU.
# Covers: transformer/utils.py get_default_causal_mask (torch.ones(..., device="cuda")),
# pipeline_parallel/schedules.py (torch.zeros/tensor(..., device="cuda") for loss reductions),
# optimizer/clip_grads.py (torch.zeros(1, device="cuda"), torch.tensor([...], device="cuda")),
# optimizer/optimizer.py and optimizer/grad_scaler.py (.cuda() on found-inf / scale tensors),
# transformer/moe/moe_utils.py save_to_aux_losses_tracker (torch.zeros(..., device="cuda")),
# distributed/param_and_grad_buffer.py (torch.cuda.current_device() as buffer device).
# --------------------------------------------------------------------------------------------
def _is_cuda_device(device) -> bool:
    if isinstance(device, int):  # torch.cuda.current_device() style ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# 3. Streams and events are no-ops on the CPU.
# Covers: transformer/moe/token_dispatcher.py (torch.cuda.current_stream / Event for
# overlapped all-to-all), distributed/distributed_data_parallel.py and
# distributed/param_and_grad_buffer.py (communication streams), utils.py (GlobalMemoryBuffer,
# nvtx ranges), timers.py (torch.cuda.synchronize).
# --------------------------------------------------------------------------------------------
def _noop(*args, **kwargs) -> None:
    return None


class _NullSync:
    """What a null stream and a null event share: made from any arguments, always complete."""

    __init__ = synchronize = _noop

    def query(self):
        return True


class _NullStream(_NullSync):
    wait_stream = wait_event = _noop

    def record_event(self, event=None):
        return event or _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent(_NullSync):
    record = wait = _noop

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # 2. rotary_pos_embedding.py:162/297, moe/router.py:90-198, utils.py GlobalMemoryBuffer:
    #    device=torch.cuda.current_device(). "cpu" is a valid device argument everywhere.
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # pipeline_parallel/utils.py (the combined 1F1B schedule of
    # --overlap-moe-expert-parallel-comm) marks its phases with NVTX ranges.
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.mark = lambda *a, **k: None
    # ... and hands freed inputs to its (null) streams: Tensor.record_stream(stream).
    record_stream = torch.Tensor.record_stream
    torch.Tensor.record_stream = lambda self, stream: (
        None if isinstance(stream, _NullStream) else record_stream(self, stream))
    # timers.py / logging: memory statistics have no CUDA meaning here; the trainer reports
    # process RSS instead.
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    # rerun_state_machine.py / tensor_parallel/random.py: manual_seed on CUDA is a no-op.
    cuda.manual_seed = lambda *a, **k: None
    cuda.manual_seed_all = lambda *a, **k: None


# --------------------------------------------------------------------------------------------
# 4. tensor_parallel/random.py CudaRNGStatesTracker keeps CUDA generator states
# (_get_cuda_rng_state / _set_cuda_rng_state). The CPU tracker forks torch's CPU generator.
# --------------------------------------------------------------------------------------------
def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Same interface as Megatron's tracker; the states are CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # _get_all_rng_states / _set_all_rng_states (used by activation recompute) read the CUDA
    # generator; the CPU generator state stands in for it.
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: None
    # model_parallel_cuda_manual_seed(force_reset_rng=True) would rebuild a CUDA tracker.
    original_init = mcore_random.initialize_rng_tracker

    @functools.wraps(original_init)
    def initialize_rng_tracker(*args, force_reset=False, **kwargs):
        if force_reset:
            mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mcore_random.initialize_rng_tracker = initialize_rng_tracker


# --------------------------------------------------------------------------------------------
# 6. transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher passes input/output split
# sizes to tensor_parallel.all_to_all as tensors; gloo's all_to_all_single accepts only lists.
# --------------------------------------------------------------------------------------------
def _gloo_all_to_all_split_sizes() -> None:
    import torch.distributed as dist

    original = dist.all_to_all_single
    if getattr(original, "_marco_cpu_shim", False):
        return

    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original(output, input, output_split_sizes, input_split_sizes, *a, **k)

    all_to_all_single._marco_cpu_shim = True
    dist.all_to_all_single = all_to_all_single


# --------------------------------------------------------------------------------------------
# 7. optimizer/clip_grads.py clip_grad_by_total_norm_fp32 asserts
# `param.grad.type() == 'torch.cuda.FloatTensor'`. optimizer/optimizer.py calls it by its
# module-global name, so that name is rebound to the same scaling without the CUDA assert.
# --------------------------------------------------------------------------------------------
def _cpu_grad_clipping() -> None:
    from megatron.core.optimizer import optimizer as mcore_optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for grad in grads:
                grad.detach().mul_(clip_coeff)

    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


# --------------------------------------------------------------------------------------------
# 8. optimizer/clip_grads.py get_grad_norm_fp32 uses `l2_norm_impl`, which without TE/apex is
# utils.py local_multi_tensor_l2_norm: `torch.norm` per tensor in fp32 (on GPU it would be
# apex's or TE's multi_tensor_l2norm). torch's CPU fp32 norm accumulates with errors of 1e-5 to
# 2e-4 relative on a 1M-element gradient (the tiny model's embedding), and the error depends
# on how the tensor is split, so the grad norm and hence the clipping factor changed with TP.
# Sums of squares in fp64 make the norm independent of the layout to ~1e-16.
# --------------------------------------------------------------------------------------------
def _accurate_grad_norm() -> None:
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is not mcore_utils.local_multi_tensor_l2_norm:
        return  # TE's or apex's kernel is in use

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        squares = [t.detach().double().square().sum() for tl in tensor_lists for t in tl]
        total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
        return total.sqrt().float().reshape(1), None

    clip_grads.l2_norm_impl = l2_norm


# --------------------------------------------------------------------------------------------
# 9. tensor_parallel/mappings.py _gather_along_first_dim with `output_split_sizes` calls
# torch.distributed.all_gather with pieces of different lengths; the alltoall dispatcher does
# so over the expert-tensor-parallel group (token_dispatcher.py dispatch_postprocess) when
# ETP > 1. Gloo's allgather requires equal sizes ("invalid tensor size"); NCCL does not.
# Pad each piece to the longest, gather, and trim.
# --------------------------------------------------------------------------------------------
class _DoneWork:
    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _gloo_uneven_all_gather() -> None:
    import torch.distributed as dist

    original = dist.all_gather
    if getattr(original, "_marco_cpu_shim", False):
        return

    @functools.wraps(original)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if len({tuple(t.shape) for t in tensor_list}) <= 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in tensor_list]
        original(pieces, padded, group=group)
        for out, piece in zip(tensor_list, pieces):
            out.copy_(piece[: out.shape[0]])
        return _DoneWork() if async_op else None

    all_gather._marco_cpu_shim = True
    dist.all_gather = all_gather


# --------------------------------------------------------------------------------------------
# 10. optimizer/distrib_optimizer.py DistributedOptimizer.__init__ and
# _build_model_and_main_param_groups, and optimizer/optimizer.py
# Float16OptimizerWithFloat16Params.__init__ (bf16 training) sort parameters by `param.type()` against
# 'torch.cuda.FloatTensor' / 'torch.cuda.HalfTensor' / 'torch.cuda.BFloat16Tensor' and raise
# TypeError for anything else. While that constructor runs, a CPU tensor's type() answers
# with the CUDA name of its dtype (nothing else changes).
# --------------------------------------------------------------------------------------------
class _CudaTypeNamesMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(result, str):
            return result.replace("torch.", "torch.cuda.", 1) if ".cuda." not in result else result
        return result


def _optimizer_type_checks_on_cpu() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        original = cls.__init__
        if getattr(original, "_marco_cpu_shim", False):
            continue

        def make(original):
            @functools.wraps(original)
            def __init__(self, *args, **kwargs):
                with _CudaTypeNamesMode():
                    original(self, *args, **kwargs)

            __init__._marco_cpu_shim = True
            return __init__

        cls.__init__ = make(original)


def enable() -> None:
    """Install the CPU shims (idempotent). Does nothing when CUDA is available; called by
    `mcore_fixes.install()`, which installs the Megatron-Core fixes first."""
    global _enabled
    if _enabled or cuda_available():
        return
    _patch_torch_cuda()
    _install_cpu_rng_tracker()
    _gloo_all_to_all_split_sizes()
    _gloo_uneven_all_gather()
    _cpu_grad_clipping()
    _accurate_grad_norm()
    _optimizer_type_checks_on_cpu()
    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _enabled = True
