#!/usr/bin/env python3
"""Serve a transformers causal LM over a subset of SGLang's native HTTP API: sampled rollouts
and per-token log-probs of given token ids (a distillation teacher, or the student's rollouts).

    python tools/serve_teacher.py --model /models/teacher-hf --port 30000 --dtype bf16
    # a cascade phase:   teacher: sglang:http://127.0.0.1:30000
    # OPD rollouts:      --rollout-engine sglang --rollout-url http://127.0.0.1:30000

For CPU runs, tests and small models: not a replacement for SGLang at scale (no paged KV cache,
no continuous batching, no CUDA graphs, no tensor parallelism). On a cluster, serve students
and teachers with `python -m sglang.launch_server` (slurm/posttrain.sh); the trainer's client
(megatron_ext/inference/sglang_client.py) speaks to either in the same words.

Routes (SGLang 0.5.23's request and response shapes):
  GET  /health            200 once the model is loaded
  GET  /get_model_info    {"model_path", "tokenizer_path" (names only, never absolute paths),
                           "weight_version", "is_generation", "vocab_size" (output rows),
                           "max_positions", "token_map": {piece: id}}
  POST /generate          {"input_ids": [[id, ...], ...] | [id, ...],
                           "sampling_params": {"temperature", "top_p", "top_k", "max_new_tokens",
                                               "stop_token_ids", ...},
                           "return_logprob", "logprob_start_len"}
                          max_new_tokens 0 scores: meta_info.input_token_logprobs, [null, id0]
                          then [log p(id_t | ids < t), id_t] at temperature 1 (as SGLang);
                          otherwise samples (temperature 0 = greedy) and returns output_ids and
                          meta_info.output_token_logprobs = log softmax(logits / T) of each
                          sampled token (T = 1 for greedy), finish_reason stop|length
  POST /update_weights_from_disk {"model_path", "weight_version"}: reload the weights from a
                          transformers directory under --update-root (refused without it)

Requests are served concurrently: each connection has its own thread (with --socket-timeout,
so an idle connection holds nothing but its thread), and one model thread runs the queued
requests' rows together in batches of --batch-size. A bad request is answered 400 with a
one-line reason (no traceback, the server keeps serving): a body over --max-body-bytes, more
than --max-rows rows, a row longer than the model's positions, ids outside the vocabulary,
a non-finite or negative temperature, ...

Binds 127.0.0.1 by default. To serve other machines give --host 0.0.0.0 on a private cluster
network only, and set a shared secret: with MARCO_ENGINE_API_KEY in the environment (of the
server and of the trainer), every route but /health wants `Authorization: Bearer <key>`
(SGLang's --api-key header), checked by both sides.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import queue
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ext.cli import DTYPES, UsageError, run_tool, tool_parser  # noqa: E402

API_KEY_ENV = "MARCO_ENGINE_API_KEY"
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids",
                 "skip_special_tokens", "no_stop_trim", "ignore_eos", "min_p", "n",
                 "sampling_seed", "spaces_between_special_tokens"}


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--model", required=True, help="transformers causal-LM directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=30000, help="port (SGLang's default)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="precision the model is loaded and run in")
    p.add_argument("--device-map", default=None, help="e.g. auto (accelerate); default: one device")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--max-rows", type=int, default=1024, help="rows per request, at most")
    p.add_argument("--max-body-bytes", type=int, default=64 << 20, help="request body, at most")
    p.add_argument("--socket-timeout", type=float, default=30.0,
                   help="seconds a connection may stay idle or slow before it is closed")
    p.add_argument("--update-root", help="/update_weights_from_disk may load directories under "
                   "this one (default: the route is refused)")
    return p


class BadRequest(Exception):
    """A request the server refuses: 400 with this one-line reason."""


# ====================================================================== the model
class Model:
    """The transformers model, its tokenizer's token map, and the forward passes."""

    def __init__(self, model_dir: str, tokenizer_dir: str | None = None, dtype: str = "bf16",
                 device_map: str | None = None, batch_size: int = 8):
        from transformers import AutoTokenizer

        self.dtype, self.device_map, self.batch_size = dtype, device_map, batch_size
        self.model = self._load(model_dir, "--model")
        tokenizer_dir = tokenizer_dir or model_dir
        try:
            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        except (OSError, ValueError) as e:
            raise UsageError(f"--tokenizer {tokenizer_dir}: cannot load ({str(e).splitlines()[0]})") from None
        self.token_map = {str(k): int(v) for k, v in tok.get_vocab().items()}
        self.info = {"model_path": os.path.basename(os.path.normpath(model_dir)),
                     "tokenizer_path": os.path.basename(os.path.normpath(tokenizer_dir)),
                     "is_generation": True}
        self.weight_version = "default"
        self.lock = threading.Lock()  # the model thread vs a weight update

    def _load(self, path: str, where: str):
        import torch
        from transformers import AutoModelForCausalLM

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{where} {path}: no config.json (not a transformers directory)")
        kw = {"dtype": getattr(torch, DTYPES[self.dtype])}
        if self.device_map:
            kw["device_map"] = self.device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
        except (OSError, ValueError) as e:
            raise UsageError(f"{where} {path}: transformers cannot load it "
                             f"({str(e).splitlines()[0]})") from None
        if not self.device_map and torch.cuda.is_available():
            model.cuda()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    @property
    def vocab_rows(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    def eos_ids(self) -> set:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def model_info(self) -> dict:
        return {**self.info, "weight_version": self.weight_version, "vocab_size": self.vocab_rows,
                "max_positions": self.max_positions, "token_map": self.token_map}

    def reload(self, path: str, version) -> None:
        model = self._load(path, "model_path")
        if int(model.get_output_embeddings().weight.shape[0]) != self.vocab_rows:
            raise BadRequest(f"model_path {path}: {model.get_output_embeddings().weight.shape[0]} "
                             f"output rows, the served model has {self.vocab_rows}")
        with self.lock:
            self.model = model
            self.weight_version = str(version) if version is not None else self.weight_version

    # ------------------------------------------------------------------ forward passes
    def _device(self):
        return next(self.model.parameters()).device

    def _left_padded(self, rows):
        import torch

        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids, mask

    def score(self, rows: list) -> list:
        """Per row: [None] + [log p(row[t] | row[:t]) for t >= 1] at temperature 1, fp32."""
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(rows), self.batch_size):
                batch = rows[s:s + self.batch_size]
                ids, mask = self._left_padded(batch)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                dev = self._device()
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                    position_ids=pos.to(dev), use_cache=False).logits
                width = ids.shape[1]
                for i, r in enumerate(batch):
                    z = logits[i, width - len(r):width - 1].float()
                    lp = torch.log_softmax(z, -1).gather(-1, torch.tensor(r[1:], device=z.device)[:, None])
                    out.append([None] + lp[:, 0].tolist())
        return out

    def generate(self, rows: list, params: dict) -> list:
        """(output ids, log-probs, finish reason dict) per row; KV-cached, left-padded."""
        out = []
        for s in range(0, len(rows), self.batch_size):
            out.extend(self._generate_batch(rows[s:s + self.batch_size], params))
        return out

    def _generate_batch(self, rows, params):
        import torch

        T, top_p, top_k = params["temperature"], params["top_p"], params["top_k"]
        n_new, stops = params["max_new_tokens"], set(params["stop_token_ids"]) | self.eos_ids()
        seed = params.get("sampling_seed")
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else
                                            int.from_bytes(os.urandom(8), "little") >> 1)
        dev = self._device()
        ids, mask = self._left_padded(rows)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        b = len(rows)
        outputs = [[] for _ in range(b)]
        logprobs = [[] for _ in range(b)]
        done = [False] * b
        with torch.no_grad():
            res = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             position_ids=pos.to(dev), use_cache=True)
            cache, next_pos = res.past_key_values, pos[:, -1] + 1
            for _ in range(n_new):
                z = res.logits[:, -1].float().cpu()
                if T == 0:
                    chosen = z.argmax(-1)
                    lp = torch.log_softmax(z, -1)
                else:
                    lp = torch.log_softmax(z / T, -1)
                    chosen = torch.multinomial(torch.softmax(_filter(z / T, top_k, top_p), -1), 1,
                                               generator=gen)[:, 0]
                picked = lp.gather(-1, chosen[:, None])[:, 0]
                for i in range(b):
                    if not done[i]:
                        outputs[i].append(int(chosen[i]))
                        logprobs[i].append(float(picked[i]))
                        done[i] = int(chosen[i]) in stops
                if all(done):
                    break
                mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
                res = self.model(input_ids=chosen[:, None].to(dev), attention_mask=mask.to(dev),
                                 position_ids=next_pos[:, None].to(dev), past_key_values=cache,
                                 use_cache=True)
                cache, next_pos = res.past_key_values, next_pos + 1
        result = []
        for o, lps in zip(outputs, logprobs):
            finish = ({"type": "stop", "matched": o[-1]} if o and o[-1] in stops
                      else {"type": "length", "length": len(o)})
            result.append((o, lps, finish))
        return result


def _filter(z, top_k: int, top_p: float):
    """top-k then top-p on temperature-scaled logits (masked to -inf)."""
    import torch

    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, -1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1:
        sorted_z, order = z.sort(-1, descending=True)
        cum = torch.softmax(sorted_z, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_z, -1) >= top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return z


# ====================================================================== batching
class Engine:
    """One model thread: queued requests' rows run together (same kind and sampling params)."""

    def __init__(self, model: Model):
        self.model = model
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="model").start()

    def submit(self, kind: str, rows: list, params: dict):
        job = {"kind": kind, "rows": rows, "params": params, "done": threading.Event()}
        self.jobs.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["result"]

    def _loop(self):
        while True:
            jobs = [self.jobs.get()]
            while True:  # everything queued meanwhile, served in the same batches
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            groups: dict = {}
            for job in jobs:
                key = (job["kind"], json.dumps(job["params"], sort_keys=True))
                groups.setdefault(key, []).append(job)
            for (kind, _), group in groups.items():
                self._run(kind, group)

    def _run(self, kind: str, group: list) -> None:
        rows = [r for job in group for r in job["rows"]]
        try:
            with self.model.lock:
                out = (self.model.score(rows) if kind == "score"
                       else self.model.generate(rows, group[0]["params"]))
            for job in group:
                job["result"], out = out[:len(job["rows"])], out[len(job["rows"]):]
        except Exception as e:  # noqa: BLE001 - reported to each waiting request
            for job in group:
                job["error"] = e
        for job in group:
            job["done"].set()


# ====================================================================== requests
def _int(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{what} must be an integer in [{lo}, {hi}], got {_brief(value)}")
    return value


def _float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a finite number, got {_brief(value)}")
    return float(value)


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def parse_generate(req, model: Model, max_rows: int):
    """(kind, rows, params, single, logprob_start_len) of a /generate body, or BadRequest."""
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object")
    if req.get("text") is not None or "input_ids" not in req:
        raise BadRequest("give input_ids (token ids); text prompts are not served")
    rows, single = req["input_ids"], False
    if isinstance(rows, list) and rows and not isinstance(rows[0], list):
        rows, single = [rows], True
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise BadRequest("input_ids must be a non-empty list of token ids, or of such lists")
    if len(rows) > max_rows:
        raise BadRequest(f"{len(rows)} rows, more than --max-rows {max_rows}")
    vocab, positions = model.vocab_rows, model.max_positions
    sp = req.get("sampling_params") or {}
    if not isinstance(sp, dict):
        raise BadRequest("sampling_params must be an object")
    unknown = set(sp) - SAMPLING_KEYS
    if unknown:
        raise BadRequest(f"sampling_params: {sorted(unknown)[0]!r} is not served")
    n_new = _int(sp.get("max_new_tokens", 128), "max_new_tokens", 0, positions)
    temperature = _float(sp.get("temperature", 1.0), "temperature")
    if temperature < 0:
        raise BadRequest(f"temperature must be >= 0, got {temperature}")
    top_p = _float(sp.get("top_p", 1.0), "top_p")
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}")
    top_k = sp.get("top_k", -1)
    if top_k != -1:
        top_k = _int(top_k, "top_k (-1 = off)", 1, 1 << 30)
    stops = sp.get("stop_token_ids") or []
    if not isinstance(stops, list):
        raise BadRequest("stop_token_ids must be a list of token ids")
    stops = [_int(t, "stop_token_ids", 0, vocab - 1) for t in stops]
    for i, r in enumerate(rows):
        if len(r) + n_new > positions:
            raise BadRequest(f"row {i}: {len(r)} tokens + max_new_tokens {n_new} exceed the "
                             f"model's {positions} positions")
        for t in r:
            _int(t, f"row {i}: token id", 0, vocab - 1)
    start = req.get("logprob_start_len", -1)
    start = -1 if start is None else _int(start, "logprob_start_len", -1, positions)
    if not isinstance(req.get("return_logprob", False), bool):
        raise BadRequest("return_logprob must be true or false")
    if req.get("stream"):
        raise BadRequest("stream is not served")
    seed = sp.get("sampling_seed")
    if seed is not None:
        _int(seed, "sampling_seed", 0, 2**63 - 1)
    params = {"temperature": temperature, "top_p": top_p, "top_k": 0 if top_k == -1 else top_k,
              "max_new_tokens": n_new, "stop_token_ids": stops, "sampling_seed": seed}
    return ("score" if n_new == 0 else "generate"), rows, params, single, start


def answer_generate(engine: Engine, req, max_rows: int):
    kind, rows, params, single, start = parse_generate(req, engine.model, max_rows)
    want_logprob = bool(req.get("return_logprob"))
    scores = engine.submit("score", rows, {}) if (want_logprob and start >= 0) or kind == "score" else None
    outs = engine.submit("generate", rows, params) if kind == "generate" else [([], [], None)] * len(rows)
    version = engine.model.weight_version
    reply = []
    for i, (r, (ids, lps, finish)) in enumerate(zip(rows, outs)):
        meta = {"id": str(i), "finish_reason": finish or {"type": "length", "length": 0},
                "prompt_tokens": len(r), "completion_tokens": len(ids), "weight_version": version,
                "cached_tokens": 0}
        if want_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, ids)]
            meta["input_token_logprobs"] = ([[lp, t, None] for lp, t in
                                             zip(scores[i][max(start, 0):], r[max(start, 0):])]
                                            if start >= 0 else [])
        reply.append({"text": "", "output_ids": ids, "meta_info": meta})
    return reply[0] if single else reply


def _under(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def make_server(engine, host: str = "127.0.0.1", port: int = 30000, *, socket_timeout: float = 30.0,
                max_body_bytes: int = 64 << 20, max_rows: int = 1024,
                update_root: str | None = None, api_key: str | None = None) -> ThreadingHTTPServer:
    """A threading HTTP server for `engine` (a Model is wrapped in an Engine; port 0: any free
    port). A port in use is one UsageError line."""
    if isinstance(engine, Model):
        engine = Engine(engine)
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None

    class Handler(BaseHTTPRequestHandler):
        timeout = socket_timeout  # per-connection socket timeout (StreamRequestHandler)

        def _reply(self, code: int, payload) -> None:
            try:
                body = json.dumps(payload, allow_nan=False).encode()
            except ValueError:  # a NaN/inf from the model: never sent as JSON's NaN
                code, body = 500, b'{"error": "the model produced a non-finite log-prob"}'
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code: int, message: str) -> None:
            self._reply(code, {"error": " ".join(str(message).split())[:300]})

        def _authorized(self) -> bool:
            if not api_key or self.path.rstrip("/") == "/health":
                return True
            got = self.headers.get("Authorization", "")
            if hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return True
            self._error(401, "unauthorized: send the shared secret as 'Authorization: Bearer "
                        f"<key>' ({API_KEY_ENV})")
            return False

        def do_GET(self):  # noqa: N802 (http.server's name)
            if not self._authorized():
                return
            route = self.path.rstrip("/")
            if route == "/health":
                self._reply(200, {})
            elif route in ("/get_model_info", "/model_info"):
                self._reply(200, engine.model.model_info())
            else:
                self._error(404, f"no route {self.path[:80]}")

        def _body(self):
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise BadRequest("a Content-Length header is needed")
            if int(length) > max_body_bytes:
                self.close_connection = True
                raise BadRequest(f"body of {length} bytes, more than --max-body-bytes {max_body_bytes}")
            try:
                return json.loads(self.rfile.read(int(length)))
            except ValueError as e:
                raise BadRequest(f"the body is not JSON ({str(e).splitlines()[0]})") from None

        def do_POST(self):  # noqa: N802
            if not self._authorized():
                return
            route = self.path.rstrip("/")
            try:
                if route == "/generate":
                    return self._reply(200, answer_generate(engine, self._body(), max_rows))
                if route == "/update_weights_from_disk":
                    return self._update(self._body())
                return self._error(404, f"no route {self.path[:80]}")
            except BadRequest as e:
                self._error(400, f"bad request: {e}")
            except UsageError as e:
                self._reply(400, {"success": False, "message": str(e)})
            except TimeoutError:
                self.close_connection = True
            except Exception as e:  # noqa: BLE001 - one line, the server keeps serving
                self._error(500, f"{type(e).__name__}: {e}")

        def _update(self, req) -> None:
            if not isinstance(req, dict) or not isinstance(req.get("model_path"), str):
                raise BadRequest("give model_path (a transformers directory)")
            if update_root is None:
                raise BadRequest("weight updates are off (start the server with --update-root)")
            path = req["model_path"]
            if not _under(path, update_root):
                raise BadRequest(f"model_path {_brief(path)} is not under the server's --update-root")
            version = req.get("weight_version")
            engine.model.reload(path, version)
            self._reply(200, {"success": True, "num_paused_requests": 0,
                              "message": f"Succeeded to update model weights. Weight version "
                                         f"updated to {version}."})

        def log_message(self, format, *args):  # quiet: one line per request would flood logs
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = False

    try:
        return Server((host, port), Handler)
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen ({e.strerror or e}; "
                         "is the port in use?)") from None


def run(args) -> int:
    if args.batch_size < 1 or args.max_rows < 1 or args.max_body_bytes < 1 or not args.socket_timeout > 0:
        raise UsageError("--batch-size, --max-rows, --max-body-bytes and --socket-timeout must be positive")
    model = Model(args.model, args.tokenizer, args.dtype, args.device_map, args.batch_size)
    server = make_server(model, args.host, args.port, socket_timeout=args.socket_timeout,
                         max_body_bytes=args.max_body_bytes, max_rows=args.max_rows,
                         update_root=args.update_root)
    auth = "shared secret required" if os.environ.get(API_KEY_ENV) else "no shared secret"
    print(f"serving {model.info['model_path']} on http://{args.host}:{server.server_address[1]} "
          f"(/generate, /health, /get_model_info; {auth})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv=None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
