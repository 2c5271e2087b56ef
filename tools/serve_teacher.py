#!/usr/bin/env python3
"""Serve a distillation teacher over HTTP: per-token log-probs of the student's token ids.

    python tools/serve_teacher.py --model /models/Qwen3-Next-80B-A3B-Instruct --port 8000 \\
        --device-map auto --dtype bf16
    # then, in a cascade phase:  teacher: http://teacher-node:8000

For a teacher too large to sit beside the student (Qwen3-Next-80B-A3B: 160 GB in bf16, a
hybrid-attention model this stack cannot build), on its own GPUs or nodes. Only `sampled-rkl`
needs nothing more than one log-prob per response token; the full-vocabulary losses need an
in-process teacher. The model is any `transformers` causal LM directory; `--device-map auto`
spreads it over the visible GPUs (accelerate).

Routes (JSON):
  GET  /info    {"model", "tokenizer", "vocab_size": output rows, "token_map": {piece: id}}
                (the trainer compares the token map with the student's before its first step)
  POST /score   {"tokens": [[id, ...], ...], "temperature": T, "vocab_size": V}
                -> {"logprobs": [[log softmax(logits_t / T)[ids[t + 1]] for t < len - 1], ...]}
                over the first V ids (the student's real vocabulary), in fp32.
Requests are served one at a time, rows in batches of --batch-size (right-padded, masked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ext.cli import DTYPES, UsageError, run_tool, tool_parser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--model", required=True, help="transformers causal-LM directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device-map", default=None, help="e.g. auto (accelerate); default: one device")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    return p


class Scorer:
    """The model and tokenizer behind the routes."""

    def __init__(self, model_dir: str, tokenizer_dir: str | None = None, dtype: str = "bf16",
                 device_map: str | None = None, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise UsageError(f"--model {model_dir}: no config.json (not a transformers directory)")
        kw = {"dtype": getattr(torch, DTYPES[dtype])}
        if device_map:
            kw["device_map"] = device_map
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
        if not device_map and torch.cuda.is_available():
            self.model.cuda()
        self.tokenizer_dir = tokenizer_dir or model_dir
        tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self.info = {"model": os.path.abspath(model_dir), "tokenizer": os.path.abspath(self.tokenizer_dir),
                     "vocab_size": int(self.model.get_output_embeddings().weight.shape[0]),
                     "token_map": dict(tok.get_vocab())}
        self.batch_size = batch_size

    def score(self, rows: list[list[int]], temperature: float, vocab_size: int) -> list[list[float]]:
        import torch

        out: list[list[float]] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = max(len(r) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    use_cache=False).logits
                for i, r in enumerate(batch):  # one row at a time: [len, V] fp32 at most
                    z = logits[i, :len(r) - 1, :vocab_size].float() / temperature
                    lp = torch.log_softmax(z, dim=-1)
                    target = torch.tensor(r[1:], device=lp.device)
                    out.append(lp.gather(-1, target[:, None])[:, 0].tolist())
        return out


def make_server(scorer: Scorer, host: str, port: int) -> HTTPServer:
    """An HTTPServer answering /info and /score with `scorer` (port 0: any free port)."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") == "/info":
                self._reply(200, scorer.info)
            else:
                self._reply(404, {"error": f"no route {self.path}"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/score":
                return self._reply(404, {"error": f"no route {self.path}"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                rows = [[int(t) for t in r] for r in req["tokens"]]
                temperature = float(req.get("temperature", 1.0))
                vocab = int(req.get("vocab_size", scorer.info["vocab_size"]))
                if not rows or min(len(r) for r in rows) < 1 or temperature <= 0:
                    raise ValueError("tokens must be non-empty rows and temperature > 0")
            except (ValueError, KeyError, TypeError) as e:
                return self._reply(400, {"error": f"bad request: {e}"})
            self._reply(200, {"logprobs": scorer.score(rows, temperature, vocab)})

        def log_message(self, format, *args):  # quiet: one line per request would flood logs
            pass

    return HTTPServer((host, port), Handler)


def run(args) -> int:
    scorer = Scorer(args.model, args.tokenizer, args.dtype, args.device_map, args.batch_size)
    server = make_server(scorer, args.host, args.port)
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]} "
          f"(/info, /score)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
