"""One client for SGLang's native HTTP API: rollouts from a served student, scores from a
served teacher (SGLang, or tools/serve_teacher.py, which speaks the same subset).

Protocol (SGLang 0.5.23, `sglang/srt/managers/io_struct.py: GenerateReqInput`,
`sglang/srt/sampling/sampling_params.py: SamplingParams`, the response built in
`sglang/srt/managers/tokenizer_manager.py`):

  POST /generate  {"input_ids": [[id, ...], ...],            one request per batch of rows
                   "sampling_params": {"temperature", "top_p", "top_k" (-1 = off),
                                       "max_new_tokens", "stop_token_ids",
                                       "skip_special_tokens": false, "no_stop_trim": true},
                   "return_logprob": true, "logprob_start_len": -1 | 0}
      -> a list, one per row: {"text", "output_ids": [...], "meta_info": {
             "finish_reason": {"type": "stop", "matched": id} | {"type": "length", "length": n},
             "prompt_tokens": n, "completion_tokens": n, "weight_version": "7",
             "output_token_logprobs": [[logprob, id, null], ...],   one per generated token
             "input_token_logprobs":  [[null, id0, null], [logprob, id1, null], ...]}}
      Rollouts: token ids in and out (nothing re-tokenised); the sampled tokens' log-probs are
      log softmax(logits / T) before top-k/top-p (T = 1 for greedy), as our generator reports.
      Scoring (a served teacher): `max_new_tokens` 0 and `logprob_start_len` 0 return, for
      every input token but the first, its log-prob given the tokens before it (SGLang computes
      these at temperature 1, whatever the request's temperature).
  GET  /health, /get_model_info ({"model_path", "tokenizer_path", "weight_version", ...})
  POST /update_weights_from_disk {"model_path", "weight_version": "<step>"}
      -> {"success", "message", "num_paused_requests"}

Nothing a server says is trusted. Every reply is checked before training uses it: one row per
row sent, one log-prob per requested or generated token, every log-prob finite and <= 0, the
token ids of the input echoed, generated ids inside the vocabulary and ending as the finish
reason says, and, for a rollout engine whose weights are synced, the weight version of the
step. Anything else is an `EngineError`: one line naming the URL and what was wrong, raised
before the step trains.

Waiting: each request runs in a daemon thread; the caller waits in short slices, so a
SIGTERM/SIGUSR1 that the trainer's StopSignal records (`should_stop`) ends the wait at once
(`Interrupted`), and no request waits longer than `timeout` seconds in all (connect, send,
answer). Connection failures, timeouts and 5xx answers are retried `retries` times with
exponential backoff; a 4xx answer or a reply that fails the checks is not (the server is
wrong, not busy). Requests are spread over the URLs round-robin, several in flight at once.

Authentication: SGLang's `--api-key` (the header `Authorization: Bearer KEY`); the client sends
the key in the environment variable MARCO_ENGINE_API_KEY when set (never on a command line).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_ext.errors import MarcoError

API_KEY_ENV = "MARCO_ENGINE_API_KEY"
SGLANG_RELEASE = "0.5.23"  # the release whose protocol this client speaks (tests/test_sglang.py)
LOGPROB_TOLERANCE = 1e-6  # a log-prob above this is not a log-prob
TOP_K_OFF = -1  # SGLang's "no top-k" (our flags use 0)


class EngineError(MarcoError):
    """A rollout engine or served teacher did not answer, or answered something unusable; the
    message names the URL."""


class Interrupted(MarcoError):
    """SIGTERM/SIGUSR1 arrived while waiting on a server."""


@dataclass(frozen=True)
class ClientOptions:
    urls: tuple  # "http://host:port", one or several
    timeout: float = 600.0  # seconds a request may take in all
    retries: int = 2  # further tries after a connection failure, timeout or 5xx
    rows_per_request: int = 64  # rows batched in one /generate request
    max_in_flight: int = 0  # concurrent requests (0: 4 per URL)
    backoff: float = 0.5  # first retry's delay, doubled each time (at most 8 s)

    def check(self, flag: str = "--rollout-url") -> None:
        if not self.urls:
            raise EngineError(f"{flag}: no URL given")
        for url in self.urls:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                raise EngineError(f"{flag} {url}: expected http://HOST:PORT")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise EngineError(f"{flag}: the timeout must be a positive number of seconds, got "
                              f"{self.timeout}")
        if self.retries < 0 or self.rows_per_request < 1:
            raise EngineError(f"{flag}: retries must be >= 0 and rows per request >= 1")


@dataclass
class Sampled:
    """One row's rollout as the engine returned it (checked)."""

    output_ids: list
    logprobs: list
    finish_reason: str  # "stop" | "length"


# ====================================================================== requests
def sampling_params(*, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                    stop_token_ids: Sequence[int]) -> dict:
    """SGLang's sampling_params for our settings (temperature 0 = greedy; top_k 0 = off)."""
    return {"temperature": float(temperature), "top_p": float(top_p),
            "top_k": int(top_k) if top_k else TOP_K_OFF, "max_new_tokens": int(max_new_tokens),
            "stop_token_ids": [int(i) for i in stop_token_ids],
            "skip_special_tokens": False, "no_stop_trim": True}


def generate_request(rows: Sequence[Sequence[int]], params: dict) -> dict:
    """A /generate request sampling each row's response (log-probs of the generated tokens)."""
    return {"input_ids": [[int(t) for t in r] for r in rows], "sampling_params": dict(params),
            "return_logprob": True, "logprob_start_len": -1}


def score_request(rows: Sequence[Sequence[int]]) -> dict:
    """A /generate request that generates nothing and returns every input token's log-prob."""
    return {"input_ids": [[int(t) for t in r] for r in rows],
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 0},
            "return_logprob": True, "logprob_start_len": 0}


def update_weights_request(model_path: str, step: int) -> dict:
    return {"model_path": model_path, "weight_version": str(int(step)), "flush_cache": True}


# ====================================================================== replies
def _bad(url: str, what: str) -> EngineError:
    return EngineError(f"{url}: {what}")


def _rows_of(reply, url: str, n: int) -> list:
    if isinstance(reply, dict) and n == 1:
        reply = [reply]
    if not isinstance(reply, list) or len(reply) != n:
        got = f"{len(reply)} rows" if isinstance(reply, list) else type(reply).__name__
        raise _bad(url, f"/generate answered {got} for {n} rows sent")
    for i, item in enumerate(reply):
        if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
            raise _bad(url, f"/generate row {i}: no meta_info")
    return reply


def _logprob(value, url: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(url, f"{where}: log-prob {value!r} is not a number")
    v = float(value)
    if not math.isfinite(v) or v > LOGPROB_TOLERANCE:
        raise _bad(url, f"{where}: log-prob {v!r} (expected a finite number <= 0)")
    return min(v, 0.0)


def _token(value, url: str, where: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise _bad(url, f"{where}: token id {value!r} is not in [0, {vocab_size})")
    return value


def _entries(meta: dict, key: str, url: str, where: str) -> list:
    entries = meta.get(key)
    if not isinstance(entries, list):
        raise _bad(url, f"{where}: no meta_info.{key} list")
    for j, e in enumerate(entries):
        if not isinstance(e, (list, tuple)) or len(e) < 2:
            raise _bad(url, f"{where}: meta_info.{key}[{j}] is not [logprob, token_id, ...]")
    return entries


def _check_version(meta: dict, url: str, where: str, expected: Optional[int]) -> None:
    if expected is None:
        return
    got = meta.get("weight_version")
    if str(got) != str(expected):
        raise _bad(url, f"{where}: weight_version {got!r}, expected {str(expected)!r} (the "
                   "engine is not serving the weights of this step)")


def parse_generation(reply, url: str, rows: Sequence[Sequence[int]], *, max_new_tokens: int,
                     stop_token_ids: Sequence[int], vocab_size: int,
                     weight_version: Optional[int] = None) -> list[Sampled]:
    """The checked rollouts of a /generate reply to generate_request(rows, ...)."""
    stops = {int(i) for i in stop_token_ids}
    out = []
    for i, item in enumerate(_rows_of(reply, url, len(rows))):
        where = f"/generate row {i}"
        meta = item["meta_info"]
        entries = _entries(meta, "output_token_logprobs", url, where)
        if not 1 <= len(entries) <= max_new_tokens:
            raise _bad(url, f"{where}: {len(entries)} generated tokens (expected 1 to "
                       f"max_new_tokens {max_new_tokens})")
        ids = [_token(e[1], url, where, vocab_size) for e in entries]
        lps = [_logprob(e[0], url, where) for e in entries]
        if "output_ids" in item and item["output_ids"] != ids:
            raise _bad(url, f"{where}: output_ids differ from the tokens of output_token_logprobs")
        if meta.get("prompt_tokens", len(rows[i])) != len(rows[i]):
            raise _bad(url, f"{where}: prompt_tokens {meta.get('prompt_tokens')!r}, "
                       f"{len(rows[i])} sent")
        finish = meta.get("finish_reason")
        kind = finish.get("type") if isinstance(finish, dict) else finish
        early = [j for j, t in enumerate(ids[:-1]) if t in stops]
        if early:
            raise _bad(url, f"{where}: stop token {ids[early[0]]} at position {early[0]} is not "
                       "the last generated token")
        if kind == "stop" and ids[-1] not in stops:
            raise _bad(url, f"{where}: finish_reason stop, but the last token {ids[-1]} is not a "
                       f"stop token {sorted(stops)}")
        if kind == "length" and (len(ids) != max_new_tokens or ids[-1] in stops):
            raise _bad(url, f"{where}: finish_reason length after {len(ids)} of "
                       f"{max_new_tokens} tokens")
        if kind not in ("stop", "length"):
            raise _bad(url, f"{where}: finish_reason {finish!r} (expected stop or length)")
        _check_version(meta, url, where, weight_version)
        out.append(Sampled(ids, lps, kind))
    return out


def parse_scores(reply, url: str, rows: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per row, log p(row[t] | row[:t]) for t = 1 .. len - 1, from a reply to score_request."""
    out = []
    for i, item in enumerate(_rows_of(reply, url, len(rows))):
        where = f"/generate row {i}"
        entries = _entries(item["meta_info"], "input_token_logprobs", url, where)
        row = rows[i]
        if len(entries) != len(row):
            raise _bad(url, f"{where}: {len(entries)} input log-probs for {len(row)} tokens sent")
        for j, (e, t) in enumerate(zip(entries, row)):
            if e[1] != t:
                raise _bad(url, f"{where}: input token {j} is {e[1]!r}, {t} was sent")
        out.append([_logprob(e[0], url, where) for e in entries[1:]])
    return out


def parse_update(reply, url: str, step: int) -> None:
    if not isinstance(reply, dict) or reply.get("success") is not True:
        message = reply.get("message") if isinstance(reply, dict) else reply
        raise _bad(url, f"/update_weights_from_disk failed for step {step}: {_short(message)}")


def _short(value, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ====================================================================== transport
class _Retry(Exception):
    """A failure worth another try (connection, timeout, 5xx)."""


class _Call:
    """One request in a daemon thread; `result` or `error` once `done` is set."""

    def __init__(self, client: "SGLangClient", url: str, method: str, route: str,
                 payload: Optional[dict]):
        self.url, self.route = url, route
        self.done = threading.Event()
        self.result, self.error = None, None
        self.budget = client.opts.timeout * (client.opts.retries + 1) + client._backoff_total()
        self.deadline: Optional[float] = None  # set once a slot is free and the request starts
        self.thread = threading.Thread(target=self._run, args=(client, method, payload),
                                       daemon=True, name=f"engine-request {url}{route}")

    def _run(self, client, method, payload):
        try:
            with client._slots:
                self.deadline = time.monotonic() + self.budget
                self.result = client._request_with_retries(self.url, method, self.route, payload)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self.error = e
        finally:
            self.done.set()


class SGLangClient:
    """Calls to one or several servers speaking SGLang's native API (see the module doc)."""

    def __init__(self, opts: ClientOptions, *, what: str = "rollout engine",
                 should_stop: Optional[Callable[[], Optional[int]]] = None):
        opts.check()
        self.opts, self.what = opts, what
        self.should_stop = should_stop or (lambda: None)
        self.api_key = os.environ.get(API_KEY_ENV) or None
        self._slots = threading.BoundedSemaphore(opts.max_in_flight or 4 * len(opts.urls))
        self._next = 0

    # ------------------------------------------------------------------ one request
    def _backoff_total(self) -> float:
        return sum(min(self.opts.backoff * 2 ** k, 8.0) for k in range(self.opts.retries))

    def _once(self, url: str, method: str, route: str, payload: Optional[dict]):
        parts = urllib.parse.urlsplit(url)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname, parts.port, timeout=self.opts.timeout)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = None if payload is None else json.dumps(payload).encode()
        started = time.monotonic()
        try:
            conn.request(method, route, body=body, headers=headers)
            resp = conn.getresponse()
            data = bytearray()
            while True:  # read in pieces so that a slow drip still ends at the deadline
                piece = resp.read1(1 << 16) if hasattr(resp, "read1") else resp.read(1 << 16)
                if not piece:
                    break
                data += piece
                if time.monotonic() - started > self.opts.timeout:
                    raise TimeoutError
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            reason = "no answer within the timeout" if isinstance(e, TimeoutError) else \
                f"{type(e).__name__}: {_short(e, 120)}"
            raise _Retry(f"{route}: {reason}") from None
        finally:
            conn.close()
        if resp.status >= 500:
            raise _Retry(f"{route}: HTTP {resp.status} {_short(data.decode(errors='replace'), 160)}")
        if resp.status == 401:
            raise _bad(url, f"{route}: HTTP 401 (the server wants the shared secret in "
                       f"{API_KEY_ENV})")
        try:
            reply = json.loads(bytes(data))
        except ValueError:
            raise _bad(url, f"{route}: HTTP {resp.status}, not JSON: "
                       f"{_short(data.decode(errors='replace'), 160)!r}") from None
        if resp.status >= 400 and not (route == "/update_weights_from_disk" and isinstance(reply, dict)):
            detail = reply.get("error", reply) if isinstance(reply, dict) else reply
            raise _bad(url, f"{route}: HTTP {resp.status} {_short(detail, 200)}")
        return reply

    def _request_with_retries(self, url, method, route, payload):
        last = None
        for attempt in range(self.opts.retries + 1):
            if attempt:
                time.sleep(min(self.opts.backoff * 2 ** (attempt - 1), 8.0))
            try:
                return self._once(url, method, route, payload)
            except _Retry as e:
                last = str(e)
        tries = self.opts.retries + 1
        raise _bad(url, f"{last} ({tries} tr{'y' if tries == 1 else 'ies'}, --rollout-timeout "
                   f"{self.opts.timeout:g} s; is the {self.what} up?)")

    # ------------------------------------------------------------------ waiting
    def _start(self, url, method, route, payload) -> _Call:
        call = _Call(self, url, method, route, payload)
        call.thread.start()
        return call

    def _wait(self, calls: list) -> list:
        """Results in order; the first error (by order) raised; a signal interrupts."""
        for call in calls:
            while not call.done.wait(0.05):
                sig = self.should_stop()
                if sig is not None:
                    raise Interrupted(f"signal {sig} while waiting on {self.what} {call.url}"
                                      f"{call.route}")
                if call.deadline is not None and time.monotonic() > call.deadline + 1.0:
                    raise _bad(call.url, f"{call.route}: no answer within the timeout")
            if call.error is not None:
                raise call.error
        return [c.result for c in calls]

    def call(self, route: str, payload: Optional[dict] = None, url: Optional[str] = None):
        """One request (GET without a payload) to `url` (default: the first)."""
        method = "GET" if payload is None else "POST"
        return self._wait([self._start(url or self.opts.urls[0], method, route, payload)])[0]

    def call_all(self, route: str, payload: Optional[dict] = None) -> list:
        """The same request to every URL (health, weight updates), concurrently."""
        method = "GET" if payload is None else "POST"
        return self._wait([self._start(u, method, route, payload) for u in self.opts.urls])

    def _spread(self, rows, make, parse) -> list:
        n = self.opts.rows_per_request
        chunks = [list(range(s, min(s + n, len(rows)))) for s in range(0, len(rows), n)]
        calls = []
        for idx in chunks:
            url = self.opts.urls[self._next % len(self.opts.urls)]
            self._next += 1
            calls.append((idx, self._start(url, "POST", "/generate", make([rows[i] for i in idx]))))
        results = self._wait([c for _, c in calls])
        out = [None] * len(rows)
        for (idx, call), reply in zip(calls, results):
            for i, value in zip(idx, parse(reply, call.url, [rows[i] for i in idx])):
                out[i] = value
        return out

    # ------------------------------------------------------------------ the protocol
    def health(self) -> None:
        self.call_all("/health")

    def model_info(self) -> list[dict]:
        infos = self.call_all("/get_model_info")
        for url, info in zip(self.opts.urls, infos):
            if not isinstance(info, dict):
                raise _bad(url, "/get_model_info: not a JSON object")
        return infos

    def generate(self, rows: Sequence[Sequence[int]], *, temperature: float, top_p: float,
                 top_k: int, max_new_tokens: int, stop_token_ids: Sequence[int], vocab_size: int,
                 weight_version: Optional[int] = None) -> list[Sampled]:
        params = sampling_params(temperature=temperature, top_p=top_p, top_k=top_k,
                                 max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)

        def parse(reply, url, sent):
            return parse_generation(reply, url, sent, max_new_tokens=max_new_tokens,
                                    stop_token_ids=stop_token_ids, vocab_size=vocab_size,
                                    weight_version=weight_version)

        return self._spread(rows, lambda sent: generate_request(sent, params), parse)

    def score(self, rows: Sequence[Sequence[int]]) -> list[list[float]]:
        return self._spread(rows, score_request, parse_scores)

    def update_weights_from_disk(self, model_path: str, step: int) -> None:
        payload = update_weights_request(model_path, step)
        for url, reply in zip(self.opts.urls, self.call_all("/update_weights_from_disk", payload)):
            parse_update(reply, url, step)
        for url, info in zip(self.opts.urls, self.model_info()):
            if str(info.get("weight_version")) != str(step):
                raise _bad(url, f"/get_model_info: weight_version {info.get('weight_version')!r} "
                           f"after the update to step {step}")
