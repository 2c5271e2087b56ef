"""`MarcoLM`: an lm-evaluation-harness model backed by a Megatron checkpoint.

lm-eval asks a model three things: the log-likelihood of a continuation given a context
(multiple choice), the rolling log-likelihood of a whole text (perplexity), and a generation
until a stop string (generative tasks). `MarcoLM` answers them with our Megatron-Core GPTModel,
built and loaded by `megatron_ext.inference.loading.load_model_from_checkpoint` under one-process parallel
state, so a checkpoint saved at any TP/PP/EP layout evaluates as it is, without exporting.

Equal to lm-eval's `hf` model by construction. It subclasses lm-eval's `TemplateLM`, which
splits each (context, continuation) into token ids the way the `hf` model does (whole string
encoded, context prefix cut off; an empty context becomes the prefix token: BOS if the
tokenizer has one, else EOS), and scores the same windows: `(context + continuation)[-(L+1):]
[:-1]` for the maximum length L (the preset's `max_position_embeddings`, which an export writes
to config.json, where lm-eval's `hf` reads it), right-padded, log-softmax in fp32 over the
whole (padded) vocabulary, `is_greedy` from the argmax. Rolling log-likelihoods use lm-eval's
own window maker. The tokenizer is the trainer's (the one the checkpoint records, or
--tokenizer-model), whose ids equal the exported `tokenizer.json`'s. So on the same weights
the two give the same per-example log-likelihoods up to float summation order (tested within
1e-4) and the same scores.

Generation (`generate_until`) uses `megatron_ext.inference.generation.generate` (greedy unless
the task samples), stops at EOS, decodes, and cuts the text at the task's stop strings, as the
`hf` model does. `apply_chat_template` renders ChatML (`megatron_ext.inference.chat`); with
it, the tokenizer must hold <|im_start|>/<|im_end|> as single tokens (one-line error if not).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from megatron_ext.cli import require_recorded_sha256
from megatron_ext.data import build_tokenizer
from megatron_ext.errors import DataConfigError, UsageError
from megatron_ext.inference.chat import CHAT_TEMPLATE, GENERATION_PROMPT, IM_END, IM_START, ChatTokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------ tokenizer
@dataclass
class TokenizerChoice:
    """Which tokenizer evaluates a checkpoint, and where that choice came from."""

    tokenizer_type: str   # SentencePieceTokenizer | HuggingFaceTokenizer
    tokenizer_model: str  # a .model file or an HF tokenizer directory
    source: str           # "checkpoint" | "flags"


def _guess_type(path: str) -> str:
    return "SentencePieceTokenizer" if os.path.isfile(path) else "HuggingFaceTokenizer"


def resolve_tokenizer(info: dict, tokenizer_type: Optional[str] = None,
                      tokenizer_model: Optional[str] = None) -> TokenizerChoice:
    """--tokenizer-model if given, else the tokenizer `marco_model.json` records (the trainer:
    tokenizer_type/tokenizer_model/sha256; import and upcycling: type/model), checked against
    its recorded sha256 (`cli.require_recorded_sha256`, as tools/export_mcore_to_hf.py checks it)."""
    if tokenizer_model:
        if not os.path.exists(tokenizer_model):
            raise UsageError(f"--tokenizer-model {tokenizer_model}: no such file or directory")
        return TokenizerChoice(tokenizer_type or _guess_type(tokenizer_model), tokenizer_model, "flags")
    recorded = info.get("tokenizer") or {}
    path = recorded.get("tokenizer_model") or recorded.get("model")
    if not path:
        raise UsageError("the checkpoint's marco_model.json records no tokenizer; give "
                         "--tokenizer-type and --tokenizer-model")
    if not os.path.exists(path):
        raise UsageError(f"the checkpoint's tokenizer {path} is not there; give --tokenizer-model")
    require_recorded_sha256(path, recorded.get("sha256"),
                            "give --tokenizer-model with the one it was trained with")
    kind = recorded.get("tokenizer_type") or recorded.get("type") or _guess_type(path)
    return TokenizerChoice(kind, path, "checkpoint")


class TextTokenizer:
    """The trainer's Megatron tokenizer (megatron_ext.data.build_tokenizer) as lm-eval needs it.

    `encode` parses special/user-defined pieces written in the text (ChatML markers) as single
    tokens, as a Hugging Face tokenizer's `encode` does; `decode` drops control tokens."""

    def __init__(self, choice: TokenizerChoice):
        self.choice = choice
        self.name = str(choice.tokenizer_model)
        self.megatron = build_tokenizer(choice.tokenizer_type, choice.tokenizer_model)
        self.vocab_size = int(self.megatron.vocab_size)
        self.eos_id = int(self.megatron.eod)
        bos = None
        with contextlib.suppress(Exception):  # HF tokenizers without BOS raise or return None
            bos = self.megatron.bos
        self.bos_id = int(bos) if bos is not None and 0 <= int(bos) < self.vocab_size else None

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.megatron.tokenize(text)]

    def piece(self, token_id: int) -> Optional[str]:
        return getattr(self.megatron, "inv_vocab", {}).get(token_id)

    def decode(self, ids) -> str:
        hf = getattr(getattr(self.megatron, "_tokenizer", None), "tokenizer", None)
        if hf is not None and hasattr(hf, "decode") and not hasattr(hf, "id_to_piece"):
            return hf.decode(list(ids), skip_special_tokens=True)
        return self.megatron.detokenize(list(ids))


# ------------------------------------------------------------------------------ the model
def checkpoint_step(ckpt_dir: str) -> Optional[int]:
    m = re.search(r"iter_(\d+)$", os.path.basename(os.path.normpath(ckpt_dir)))
    return int(m.group(1)) if m else None


@register_model("marco")
class MarcoLM(TemplateLM):
    """lm-eval model over a Megatron checkpoint: once this module is imported,
    `simple_evaluate(model="marco", model_args="load=CKPT[,dtype=bf16,batch_size=16,
    tokenizer_model=PATH,max_length=N]")`; or `MarcoLM(load=...)`, or
    `MarcoLM.from_model(model, tokenizer, max_length)` around a model already built."""

    def __init__(self, load: Optional[str] = None, dtype: str = "fp32", batch_size: int | str = 8,
                 max_length: Optional[int] = None, tokenizer_type: Optional[str] = None,
                 tokenizer_model: Optional[str] = None, expert_backend: str = "sequential",
                 max_gen_toks: int = 256, seed: int = 0, **_ignored):
        super().__init__()
        self._stack = contextlib.ExitStack()
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_gen_toks = int(max_gen_toks)
        self.settings: dict = {}
        if load is None:  # from_model() fills the rest
            return
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
        # Megatron-Core (seconds) only for --load: an HF model's evaluation never imports it.
        from megatron_ext import checkpointing, parallel
        from megatron_ext.inference.loading import load_model_from_checkpoint

        ckpt = checkpointing.resolve_checkpoint_dir(load)
        info = checkpointing.read_model_info(ckpt)
        choice = resolve_tokenizer(info, tokenizer_type, tokenizer_model)
        tokenizer = TextTokenizer(choice)
        self._stack.enter_context(parallel.single_process(seed))
        try:
            model, preset = load_model_from_checkpoint(ckpt, expert_backend=expert_backend,
                                                       params_dtype=DTYPES[dtype])
        except Exception:
            self._stack.close()
            raise
        if tokenizer.vocab_size > preset.vocab_size:
            raise DataConfigError(f"--tokenizer-model {tokenizer.name}: {tokenizer.vocab_size} tokens, "
                                  f"more than the checkpoint's vocabulary of {preset.vocab_size}")
        self._attach(model, tokenizer, int(max_length or preset.max_position_embeddings))
        self.settings = {"checkpoint": os.path.abspath(ckpt), "step": checkpoint_step(ckpt),
                         "preset": preset.name, "dtype": dtype,
                         "tokenizer": {"type": choice.tokenizer_type, "model": choice.tokenizer_model,
                                       "from": choice.source}}

    @classmethod
    def from_model(cls, model, tokenizer: TextTokenizer, max_length: int, batch_size: int = 8):
        """Wrap an already built Megatron model (the caller holds the parallel state)."""
        lm = cls(load=None, batch_size=batch_size)
        lm._attach(model, tokenizer, max_length)
        return lm

    def _attach(self, model, tokenizer: TextTokenizer, max_length: int) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self._max_length = max_length
        self._device = next(model.parameters()).device

    def close(self) -> None:
        """Tear down the parallel state this instance started (if it started one)."""
        self._stack.close()

    # ---------------------------------------------------------------- lm-eval's interface
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kw) -> list[int]:
        ids = self.tok.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        if not chat_template:
            return None

        return CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """ChatML text, as transformers' `apply_chat_template(tokenize=False)` renders it with
        the template an export ships (`continue_final_message` when not adding the prompt)."""

        if not getattr(self, "_chat_checked", False):
            ChatTokenizer.from_megatron(self.tok.megatron)  # one-line error if not chat-capable
            self._chat_checked = True
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in chat_history)
        if add_generation_prompt:
            return text + GENERATION_PROMPT
        return text[: -len(f"{IM_END}\n")] if chat_history else text

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), **self.settings}

    # ---------------------------------------------------------------- scoring
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """fp32 log-softmax of the model's logits for right-padded rows: [b, s, vocab]."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        tokens = tokens.to(self._device)
        positions = torch.arange(width, device=self._device).expand_as(tokens)
        with torch.no_grad():
            logits = self.model(tokens, positions, None)
        clear_aux_losses_tracker()
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        """Same windows, padding and arithmetic as lm-eval's `hf` model (`HFLM`)."""
        res = []
        re_ord = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                          group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in re_ord.get_batched(n=self.batch_size):
            rows = []
            for _, context_enc, continuation_enc in chunk:
                if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                    raise UsageError(f"a request has {len(context_enc)} context / "
                                     f"{len(continuation_enc)} continuation tokens; "
                                     f"lm-eval needs both > 0 and the continuation <= {self.max_length}")
                rows.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
            log_probs = self._log_probs(rows)
            for (request, ctx_tokens, cont_toks), row, row_lp in zip(chunk, rows, log_probs):
                scored = row_lp[len(row) - len(cont_toks): len(row)].unsqueeze(0)
                greedy = scored.argmax(dim=-1)
                # one forward serves every request that differs only in a one-token continuation
                for request_str, cont, lp in re_ord.get_cache(
                        req_str=request, cxt_toks=ctx_tokens, cont_toks=cont_toks, logits=scored):
                    cont = torch.tensor(cont, dtype=torch.long, device=lp.device).unsqueeze(0)
                    is_greedy = bool((greedy[:, -cont.shape[1]:] == cont).all())
                    answer = (float(torch.gather(lp, 2, cont.unsqueeze(-1)).sum()), is_greedy)
                    res.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    bar.update(1)
        bar.close()
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation per distinct gen_kwargs; the text is cut at the first stop string."""
        from lm_eval.models.utils import postprocess_generated_text

        res = []
        re_ord = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                          group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tok.piece(self.eot_token_id)  # the `hf` model adds it as a stop string
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in re_ord.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise UsageError(f"max_gen_toks {max_new} must be below the model's maximum length "
                                 f"{self.max_length}")
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_new) for c in contexts]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            outputs = self._generate(prompts, max_new, temperature, float(kwargs.get("top_p", 1.0)),
                                     int(kwargs.get("top_k", 0) or 0), until)
            for context, gen_kwargs, ids in zip(contexts, all_kwargs, outputs):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return re_ord.get_original(res)

    def _stop_ids(self, until: list[str]) -> tuple[int, ...]:
        """EOS, and every stop string that is one token: generation may end there (the text is
        cut at the stop strings afterwards either way, so this only saves work)."""
        ids = [self.eot_token_id]
        for text in until:
            enc = self.tok.encode(text)
            if len(enc) == 1:
                ids.append(enc[0])
        return tuple(dict.fromkeys(ids))

    def _generate(self, prompts: list[list[int]], max_new: int, temperature: float, top_p: float,
                  top_k: int, until: list[str]) -> list[list[int]]:
        """Output ids without EOS: the SFT issue's generator where it exists, else a plain
        greedy loop (full forward per token; CPU-sized models only)."""
        stop_ids = self._stop_ids(until)
        try:
            from megatron_ext.inference.generation import SamplingParams, generate
        except ImportError:
            if temperature:
                raise UsageError("sampling needs megatron_ext.inference.generation") from None
            return [self._greedy(p, max_new, stop_ids) for p in prompts]
        params = SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                                top_p=top_p, stop_ids=stop_ids)
        out = generate(self.model, prompts, params, batch_size=self.batch_size,
                       vocab_size=self.tok.vocab_size)
        return [[i for i in g.output_ids if i != self.eot_token_id] for g in out]

    def _greedy(self, prompt: list[int], max_new: int, stop_ids: tuple[int, ...]) -> list[int]:
        out: list[int] = []
        for _ in range(max_new):
            nxt = int(self._log_probs([prompt + out])[0, -1].argmax())
            if nxt == self.eot_token_id:
                break
            out.append(nxt)
            if nxt in stop_ids:
                break
        return out
