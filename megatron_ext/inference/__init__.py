"""Inference: loading a checkpoint to run, the chat format, generation and rollout engines;
what evaluation, conversion and post-training share (none of them imports another for it).

    loading.py           load_model_from_checkpoint (any saved layout -> this layout), and
                         recorded_router (a checkpoint's router as trained)
    chat.py              ChatML: CHAT_TEMPLATE, ChatTokenizer, render_conversation (ids + loss
                         mask), render_prompt, validate_messages, read_chat_jsonl
    generation.py        generate(model, prompts, SamplingParams) -> [Generation]: batched,
                         KV-cached sampling on the Megatron model at any TP/EP layout
    decode_shortcuts.py  what generation swaps in while decoding (TP-size-1 linears and router
                         gating as plain matmuls, RoPE once per forward)

Rollout engines produce the student's samples (and served teachers score them) for on-policy
distillation. The in-process engine is the Megatron generator (generation.py: CPU, tests,
small GPU runs, the reference); at cluster scale the rollouts and the served teachers run on
SGLang, reached through one client of SGLang's native HTTP API:

    sglang_client.py  SGLangClient: /generate (token ids in, token ids and log-probs out),
                      /health, /get_model_info, /update_weights_from_disk; requests spread
                      over several servers, bounded timeouts and retries, interruptible by
                      SIGTERM/SIGUSR1, and every reply checked before training uses it
    weight_sync.py    the student's weights to a rollout engine after an optimizer step: the
                      streaming Hugging Face export to a shared directory, then
                      /update_weights_from_disk with the step checked on the answer

tools/serve_teacher.py speaks the same subset of the protocol (transformers behind it), for
CPU runs, tests and small models. User guide: docs/posttraining.md.
"""
