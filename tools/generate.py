#!/usr/bin/env python3
"""Generate continuations with a Marco Megatron-Core checkpoint (KV-cached, batched).

    python tools/generate.py --load runs/sft/ckpt --prompts prompts.jsonl --out answers.jsonl
    python tools/generate.py --load ckpt --prompts p.jsonl --out o.jsonl --temperature 0 \\
        --num-tokens-to-generate 64
    torchrun --nproc-per-node 2 tools/generate.py --load ckpt --prompts p.jsonl --out o.jsonl \\
        --expert-model-parallel-size 2

Each input line is `{"prompt": "raw text"}` (tokenised as plain text: special-token strings
are not parsed) or `{"messages": [{"role": ..., "content": ...}, ...]}` (rendered as ChatML up
to the last user turn, then `<|im_start|>assistant\\n`, as `apply_chat_template(...,
add_generation_prompt=True)` does); other keys are copied to the output. Each output line adds
`prompt_ids`, `output_ids` (up to and including the first stop token, `<|im_end|>` or EOS),
`text` (the output decoded, without the stop token), `logprobs` (per output token, log softmax
of logits / T; T = 1 when greedy) and `finish_reason` ("stop" or "length"). `--temperature 0`
is greedy. The tokenizer is the one the checkpoint records unless `--tokenizer-type` /
`--tokenizer-model` say otherwise. The output file appears only when complete.
Generation itself is megatron_ext/inference/generation.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ext.cli import HelpFormatter, UsageError, add_expert_backend_flag, run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root (latest iteration) or iter_N dir")
    p.add_argument("--prompts", required=True, help="input .jsonl: {\"prompt\": ...} or "
                   "{\"messages\": [...]} per line")
    p.add_argument("--out", required=True, help="output .jsonl (written when complete)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g = p.add_argument_group("sampling")
    # Megatron-LM's inference names (--num-tokens-to-generate, --top_k, --top_p) and ours.
    g.add_argument("--num-tokens-to-generate", "--max-new-tokens", dest="max_new_tokens",
                   type=int, default=256, help="tokens generated per prompt, at most")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0,
                   help="sample from the k most likely tokens; 0 = off")
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of tokens with this much probability; "
                        "1.0 = off")
    g.add_argument("--seed", type=int, default=1234, help="sampling seed")
    g.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    g = p.add_argument_group("tokenizer (default: the one the checkpoint records)")
    g.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="kind of --tokenizer-model")
    g.add_argument("--tokenizer-model", help="SentencePiece .model file or HF tokenizer directory")
    g = p.add_argument_group("model")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="must be 1 (generation runs the whole model on each rank)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="expert-parallel size")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="default: the tensor-parallel size (as in training and Megatron-LM)")
    add_expert_backend_flag(g)
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    return p


# ------------------------------------------------------------------------------ input
def read_requests(path: str) -> list[tuple[int, dict]]:
    """(line number, JSON object) of every non-blank line; one-line errors naming FILE:LINE."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--prompts {path}: cannot open ({e.strerror or e})") from None
    requests = []
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
                kind = [k for k in ("prompt", "messages") if isinstance(obj, dict) and k in obj]
                if len(kind) == 2:
                    raise UsageError(f"{where}: has both \"prompt\" and \"messages\"; expected "
                                     "one of them")
                if not kind:
                    raise UsageError(f"{where}: expected an object with either \"prompt\" (text) or "
                                     "\"messages\" (a chat), found neither")
                try:  # JSON's "\ud800" escapes: lone surrogates no tokenizer or output takes
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as e:
                    raise UsageError(f"{where}: has a lone surrogate {e.object[e.start]!r}; expected "
                                     "valid Unicode text") from None
                if kind == ["prompt"] and not isinstance(obj["prompt"], str):
                    raise UsageError(f"{where}: \"prompt\" must be a string")
                requests.append((n, obj))
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts {path}: not UTF-8 text ({e.reason})") from None
    if not requests:
        raise UsageError(f"--prompts {path}: no prompts (the file is empty)")
    return requests


class TextCodec:
    """What the tool needs of a tokenizer: the chat view where the tokenizer has ChatML's
    tokens, else plain text only (then "messages" lines are refused)."""

    def __init__(self, kind: str, model):
        from megatron_ext.data import build_tokenizer
        from megatron_ext.errors import DataConfigError
        from megatron_ext.inference.chat import ChatTokenizer

        self.megatron = build_tokenizer(kind, model)
        self.name = str(getattr(self.megatron, "path", model))
        try:
            self.chat = ChatTokenizer.from_megatron(self.megatron)
            self.no_chat = None
        except DataConfigError as e:
            self.chat, self.no_chat = None, str(e)
        self.vocab_size = self.chat.vocab_size if self.chat else self.megatron.vocab_size
        self.stop_ids = self.chat.stop_ids if self.chat else (int(self.megatron.eod),)

    def encode(self, text: str) -> list[int]:
        return self.chat.encode(text) if self.chat else list(self.megatron.tokenize(text))

    def decode(self, ids) -> str:
        return self.chat.decode(ids) if self.chat else self.megatron.detokenize(list(ids))

    def prompt_ids(self, obj: dict, where: str) -> list[int]:
        from megatron_ext.errors import DataConfigError
        from megatron_ext.inference import chat

        if "prompt" in obj:
            ids = self.encode(obj["prompt"])
            if not ids:
                raise UsageError(f"{where}: the prompt is empty")
            return ids
        if self.chat is None:
            raise UsageError(f"{where}: \"messages\" needs a chat tokenizer; {self.no_chat}")
        chat.validate_messages(obj["messages"], where, require_assistant=False)
        try:
            return chat.render_prompt(obj["messages"], self.chat)
        except DataConfigError as e:
            raise UsageError(f"{where}: {str(e).split(': ', 1)[-1]}") from None


def tokenizer_args(args, info: dict) -> tuple[str, str | None]:
    recorded = info.get("tokenizer") or {}
    kind = args.tokenizer_type or recorded.get("tokenizer_type") or recorded.get("type")
    model = args.tokenizer_model or recorded.get("tokenizer_model") or recorded.get("model")
    if args.tokenizer_model and not args.tokenizer_type:
        kind = "HuggingFaceTokenizer" if os.path.isdir(args.tokenizer_model) else "SentencePieceTokenizer"
    return kind or "SentencePieceTokenizer", model


# ------------------------------------------------------------------------------ model
def layout_from_args(args, preset):
    from megatron_ext.parallel import ParallelLayout, validate_layout, world_size_from_env

    if args.pipeline_model_parallel_size != 1:
        raise UsageError(f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: "
                         "generation needs 1 (checkpoints reshard to any layout)")
    tp = args.tensor_model_parallel_size
    layout = ParallelLayout(tensor=tp, expert=args.expert_model_parallel_size,
                            expert_tensor=(tp if args.expert_tensor_parallel_size is None
                                           else args.expert_tensor_parallel_size),
                            sequence_parallel=tp > 1 and preset.is_moe)
    validate_layout(layout, preset, world_size_from_env())
    return layout


def params_dtype(choice: str):
    import torch

    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


def write_jsonl(path: str, rows) -> None:
    """All or nothing: a temporary file beside `path`, renamed when complete."""
    tmp = f"{os.path.abspath(path)}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write ({e.strerror or e}); nothing written") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(args) -> int:
    from megatron_ext.inference.generation import SamplingParams

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out}: {parent} is a file; expected a directory (or a path "
                         "to create) to hold the output file")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p)
    requests = read_requests(args.prompts)

    from megatron_ext import checkpointing, parallel

    info = checkpointing.read_model_info(args.load)
    preset = checkpointing.preset_from_checkpoint(args.load)
    layout = layout_from_args(args, preset)
    codec = TextCodec(*tokenizer_args(args, info))
    if codec.vocab_size > preset.vocab_size:
        raise UsageError(f"tokenizer {codec.name} has {codec.vocab_size} tokens, more than the "
                         f"model's vocabulary of {preset.vocab_size}")
    prompts = []
    for n, obj in requests:
        ids = codec.prompt_ids(obj, f"{args.prompts}:{n}")
        if len(ids) + params.max_new_tokens > preset.max_position_embeddings:
            raise UsageError(f"{args.prompts}:{n}: {len(ids)} prompt tokens + --max-new-tokens "
                             f"{params.max_new_tokens} exceed the model's "
                             f"{preset.max_position_embeddings} positions")
        prompts.append(ids)
    params = SamplingParams(**{**params.__dict__, "stop_ids": codec.stop_ids})

    with process_groups(layout, args.seed):
        from megatron_ext.inference.loading import load_model_from_checkpoint

        dtype = params_dtype(args.dtype)
        model, _ = load_model_from_checkpoint(
            args.load, expert_backend=args.moe_expert_backend, params_dtype=dtype)
        results = run_generation(model, prompts, params, args, codec.vocab_size)
    if parallel.is_rank_zero():
        rows = [output_row(obj, g, codec) for (_, obj), g in zip(requests, results)]
        write_jsonl(args.out, rows)
        stops = sum(g.finish_reason == "stop" for g in results)
        tokens = sum(len(g.output_ids) for g in results)
        print(f"wrote {args.out}: {len(results)} generations, {tokens} tokens, "
              f"{stops} stopped / {len(results) - stops} at --max-new-tokens", flush=True)
    return 0


@contextlib.contextmanager
def process_groups(layout, seed: int):
    """One process: Megatron's single-rank state (a caller's is kept, e.g. a test's); under
    torchrun: the layout's groups, torn down at the end."""
    from megatron_ext import parallel

    if parallel.world_size_from_env() == 1:
        with parallel.single_process(seed):
            yield
        return
    parallel.init_distributed(layout, seed)
    try:
        yield
    finally:
        parallel.shutdown()


def run_generation(model, prompts, params, args, vocab_size):
    from tqdm import tqdm

    from megatron_ext import parallel
    from megatron_ext.inference.generation import generate

    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", file=sys.stderr,
               disable=not parallel.is_rank_zero())
    try:
        return generate(model, prompts, params, seed=args.seed, batch_size=args.batch_size,
                        vocab_size=vocab_size, on_batch=bar.update, inference_mode=True)
    finally:
        bar.close()


def output_row(obj: dict, g, codec: TextCodec) -> dict:
    visible = g.output_ids[:-1] if g.finish_reason == "stop" else g.output_ids
    return {**obj, "prompt_ids": g.prompt_ids, "output_ids": g.output_ids,
            "text": codec.decode(visible), "logprobs": g.logprobs,
            "finish_reason": g.finish_reason}


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv, output="out")


if __name__ == "__main__":
    sys.exit(main())
