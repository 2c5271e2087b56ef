"""Post-training: supervised fine-tuning (SFT) on chat data, generation, on-policy distillation.

Design. Post-training runs on the pre-training stack, not beside it: the same trainer
(`posttrain_marco.py sft|opd` on megatron_ext/trainer.py), the same Megatron models, parallel
layouts and checkpoints. What changes is the data and the loss mask:

- Conversations are `{"messages": [{"role", "content"}, ...]}` (system / user / assistant,
  multi-turn), rendered with Qwen3's ChatML template (`chat.CHAT_TEMPLATE`). The rendering is
  done in token space: the ids are what Hugging Face `apply_chat_template(tokenize=True)`
  gives, and the loss mask (each assistant turn's content and its `<|im_end|>`) comes from the
  token spans of the turns, never from template markers (Qwen3's template has none).
- A preprocessing tool (tools/preprocess_chat_data.py) writes tokens and the loss mask as two
  parallel Megatron indexed datasets once; training reads them, packs several conversations per
  sequence (block-diagonal causal attention, positions restarting per conversation) and serves
  batches as a pure function of (step, rank), so resume is exact.
- Generation (KV-cached sampling on the Megatron model, any layout) serves evaluation and the
  rollouts of on-policy distillation.

Modules:
    sft_data.py    preprocessing engine (chat jsonl -> indexed tokens + loss mask),
                   add_sft_data_args / SFTDataOptions, build_sft_data -> SFTData (the
                   trainer's data interface: packed or padded batches by step), and
                   prepare_sft_sample (the bundled data/sft sample, tokenized once into a cache)
    sft.py         SFTTask (the trainer's task) and assistant_loss (SFT's validation loop)
    opd.py         OPDTask: the cascade, rollouts, teachers and losses of on-policy distillation
    rollout.py     prompt sets, sampling settings, rollout batches and their statistics
    teachers.py    in-process Megatron, transformers and served teachers
    losses.py      the OPD losses, slime's clipped surrogate and the loss reductions
    routing_replay.py  --routing-replay: the rollout's MoE routing recorded and replayed in
                   training, on Megatron-Core's RouterReplay

The chat format, generation and model loading are megatron_ext/inference/ (evaluation and
conversion use them too). User guide: docs/posttraining.md.
"""
