"""The one model builder: from a preset and the parallel/precision options to a Megatron-Core
GPTModel.

`marco_config` makes the TransformerConfig (one place for every Qwen3/Marco choice);
`build_model` builds this rank's pipeline stage with the Marco layer spec. Every caller goes
through here:

  training                 `build_stage` (the trainer, the parallel-layout tests): this
                           rank's stage under the initialised parallel state
  loading a checkpoint     inference/loading.py `load_model_from_checkpoint` (tools,
                           generation, evaluation) builds through `build_stage`
  shapes and counts only   `build_meta_model` (--describe, FLOPs, streaming conversion): the
                           full model on the meta device, always with the non-TE spec, since
                           TransformerEngine allocates real memory even under the meta device

Where the parameters live is decided here too, once: `build_model` builds under the run's device
(`run_device()`: the current CUDA device, else the CPU) and then moves whatever a module created
on a fixed device to it. Megatron-Core builds its linears on `torch.cuda.current_device()` but its
router weight without a device, and our RMSNorm takes the default device: without this a model
loaded from a checkpoint on a GPU (tools/generate.py, tools/evaluate.py --load, the teachers) had
its norms and routers on the CPU and everything else on the GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.config import ModelOptions
from megatron_ext.layer_spec import marco_block_spec
from megatron_ext.parallel import ParallelLayout, megatron_values
from megatron_ext.presets import TRANSFORMER_SHAPE, ModelPreset


def marco_config(
    preset: ModelPreset,
    layout: ParallelLayout = ParallelLayout(),
    options: ModelOptions = ModelOptions(),
    *,
    perform_initialization: bool = True,
) -> TransformerConfig:
    """The TransformerConfig of `preset` at `layout`, built as `options` say."""
    moe = options.moe
    expert_backend = options.expert_backend
    params_dtype = options.params_dtype
    recompute_granularity = options.recompute_granularity
    on_gpu = torch.cuda.is_available()
    moe_fields = {}
    if preset.is_moe:
        moe_fields = dict(
            num_moe_experts=preset.num_experts,
            moe_ffn_hidden_size=preset.moe_ffn_hidden_size,
            moe_router_topk=preset.moe_router_topk,
            # softmax over the top-k logits == softmax over all experts renormalised on the
            # top-k (qwen3_moe's norm_topk_prob=True); the router runs in fp32 by default.
            moe_router_pre_softmax=False,
            moe_z_loss_coeff=moe.z_loss_coeff or None,
            moe_token_dispatcher_type=moe.token_dispatcher,
            moe_grouped_gemm=expert_backend != "sequential",
            moe_per_layer_logging=True,
            moe_router_fusion=False,
            **megatron_values(moe),  # aux-loss coefficient, router and dispatch levers
        )
    return TransformerConfig(
        # The preset's layers, widths and heads (presets.TRANSFORMER_SHAPE, TransformerConfig's names).
        **{name: getattr(preset, name) for name in TRANSFORMER_SHAPE},
        # Qwen3: RMSNorm (eps 1e-6) with q/k norms, SwiGLU, no biases, no dropout.
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        # The loss is a token mean over the whole global batch (not a mean of micro-batch
        # means): the same under any micro-batching or data-parallel size even when micro-
        # batches hold different numbers of target tokens (SFT assistant tokens, OPD
        # responses). Megatron scales the gradients by 1 / all target tokens in
        # finalize_model_grads and rescales the router's aux/z losses to match.
        calculate_per_token_loss=True,
        # Parallelism.
        **megatron_values(layout),  # TP, PP, EP, expert-TP, CP, virtual stages
        sequence_parallel=layout.sequence_parallel,
        # Megatron-LM's p2p setting for the interleaved schedule (its --overlap-p2p-communication
        # default): one isend/irecv per direction, ordered by rank parity. The batched exchange
        # (TransformerConfig's default) pairs the two directions' messages wrongly when the
        # previous and the next stage are the same rank (PP = 2).
        overlap_p2p_comm=layout.virtual_pipeline is not None,
        batch_p2p_comm=layout.virtual_pipeline is None,
        # Precision: bf16 on GPU, fp32 on CPU; FP8 handled by TransformerEngine.
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        fp8=options.fp8_format,
        # Fused kernels need CUDA; on CPU the plain PyTorch paths run.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        perform_initialization=perform_initialization,
        recompute_modules=list(options.recompute_modules) if options.recompute_modules else None,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        # The flags Megatron names the same (fp8 recipe, init std, recompute granularity,
        # cross-entropy fusion, TP communication overlap: their megatron_field in config.py).
        **megatron_values(options),
        **moe_fields,
    )


def run_device() -> torch.device:
    """The device this process's models live on: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_model(
    preset: ModelPreset,
    config: TransformerConfig,
    expert_backend: str,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    seq_length: Optional[int] = None,
    use_te: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> GPTModel:
    """This rank's stage of a Marco model (tied embeddings, RoPE theta from the preset), every
    parameter and buffer on `device` (default `run_device()`; module docstring).

    `use_te`: build with TransformerEngine's modules (default: where TE is usable).
    `vp_stage`: the virtual pipeline stage (model chunk) to build, with interleaving."""
    device = run_device() if device is None else torch.device(device)
    with torch.device(device):
        model = _gpt_model(preset, config, expert_backend, pre_process, post_process, seq_length,
                           use_te, vp_stage)
    model.to(device)  # what a module made on a fixed device (Megatron's router buffers)
    mark_expert_params(model)
    return model


def _gpt_model(preset, config, expert_backend, pre_process, post_process, seq_length, use_te,
               vp_stage) -> GPTModel:
    return GPTModel(
        config=config,
        transformer_layer_spec=marco_block_spec(config, expert_backend, use_te, vp_stage),
        vocab_size=preset.vocab_size,
        max_sequence_length=seq_length or preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=preset.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=preset.rotary_base,
        parallel_output=True,
        vp_stage=vp_stage,
    )


def mark_expert_params(model: torch.nn.Module) -> None:
    """Reduce every expert weight's gradient over the expert-data-parallel group.

    Megatron-Core marks expert weights `allreduce=False` (-> expert grad buffers, reduced over
    the expert-DP group; expert optimizer) only when EP > 1 (tensor_parallel/layers.py,
    experts.py, TE's grouped linear: `allreduce = not expert_parallel`). With EP = 1 and
    expert-TP < TP, experts are replicated on TP ranks that route different tokens (sequence
    parallelism), yet would be reduced over the dense DP group only, which excludes those TP
    ranks: the replicas diverge. Marked at every layout, the expert-DP group (== DP whenever
    ETP == TP) does the right sum, and the optimizer is split dense/expert the same way at every
    EP size, so plain-optimizer checkpoints reshard between EP = 1 and EP > 1.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for module in model.modules():
        if isinstance(module, MoELayer):
            for param in module.experts.parameters():
                param.allreduce = False


def build_stage(
    preset: ModelPreset,
    options: ModelOptions,
    layout: Optional[ParallelLayout] = None,
    seq_length: Optional[int] = None,
) -> tuple[GPTModel, TransformerConfig]:
    """This rank's pipeline stage of `preset` under Megatron's initialised parallel state
    (`layout` defaults to that state's), and its TransformerConfig. One model chunk: with
    virtual pipeline stages use `build_stages`."""
    models, config = build_stages(preset, options, layout, seq_length)
    if len(models) != 1:
        raise ValueError("build_stage: the layout has virtual pipeline stages; use build_stages")
    return models[0], config


def build_stages(
    preset: ModelPreset,
    options: ModelOptions,
    layout: Optional[ParallelLayout] = None,
    seq_length: Optional[int] = None,
) -> tuple[list[GPTModel], TransformerConfig]:
    """This rank's model chunks (one per virtual pipeline stage, interleaved 1F1B; one chunk
    without --num-virtual-stages-per-pipeline-rank) and their TransformerConfig."""
    from megatron.core import parallel_state

    layout = layout or ParallelLayout.current()
    config = marco_config(preset, layout, options)
    stages = [None] if layout.virtual_pipeline is None else list(range(layout.virtual_pipeline))
    models = [
        build_model(
            preset,
            config,
            options.expert_backend,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            seq_length=seq_length,
            vp_stage=vp,
        )
        for vp in stages
    ]
    return models, config


def build_meta_model(
    preset: ModelPreset, dtype: torch.dtype = torch.float32, expert_backend: str = "sequential"
) -> GPTModel:
    """The full model (TP = PP = EP = 1) on the meta device: names, shapes and dtypes, no
    memory. Built with the non-TE spec (TE modules allocate real buffers even on meta; the
    checkpoint keys are the same). Needs Megatron's parallel state (one rank is enough)."""
    options = ModelOptions(params_dtype=dtype, expert_backend=expert_backend)
    config = marco_config(preset, options=options, perform_initialization=False)
    config.use_cpu_initialization = True  # create parameters without a device: meta applies
    return build_model(preset, config, expert_backend, use_te=False, device=torch.device("meta"))
