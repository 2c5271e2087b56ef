"""Inference: generation, the chat format and rollout engines.

Rollout engines produce the student's samples (and served teachers score them) for on-policy
distillation. The in-process engine is the Megatron generator (megatron_ext/posttrain/
generation.py: CPU, tests, small GPU runs, the reference); at cluster scale the rollouts and
the served teachers run on SGLang, reached through one client of SGLang's native HTTP API:

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
