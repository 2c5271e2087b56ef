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
    chat.py        ChatML: CHAT_TEMPLATE, ChatTokenizer (a chat view of the trainer's
                   SentencePiece or HF tokenizer), render_conversation (ids + loss mask),
                   render_prompt (ids up to the generation prompt), validate_messages,
                   read_chat_jsonl (FILE:LINE errors)
    sft_data.py    preprocessing engine (chat jsonl -> indexed tokens + loss mask),
                   add_sft_data_args / SFTDataOptions, build_sft_data -> SFTData (the
                   trainer's data interface: packed or padded batches by step), and
                   prepare_sft_sample (the bundled data/sft sample, tokenized once into a cache)
    generation.py  generate(model, prompts, SamplingParams) -> [Generation]

User guide: docs/posttraining.md.
"""
