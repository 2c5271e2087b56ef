"""SGLang's native protocol: the client (megatron_ext/inference/sglang_client.py) and the server
that speaks it on CPU (tools/serve_teacher.py).

- Protocol: every request the trainer sends is one SGLang accepts. SGLang 0.5.23's
  `sglang.srt.managers.io_struct` does not import without its serving dependencies (msgspec,
  zmq, pybase64, ... on CPU), so its `GenerateReqInput` fields and `SamplingParams.verify`
  rules are transcribed below (release named); the real class is used where it imports. The
  response parser reads replies in the shape SGLang 0.5.23's tokenizer_manager builds.
- The client trusts nothing: short, empty, long rows, positive or non-finite log-probs, wrong
  ids, wrong weight version, malformed JSON, a server that is down, slow or only accepts the
  connection: one line naming the URL, within the timeout's bound; SIGTERM ends a hung wait.
- The server: a bad request is a 400 with a one-line reason and the server keeps serving; an
  idle connection does not hold up another client; loopback by default; a shared secret.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO, load_tool

from megatron_ext.inference import sglang_client as sc

VOCAB = 8192
URL_RE = "http://127.0.0.1:"


# ====================================================================== SGLang 0.5.23, transcribed
# sglang/srt/managers/io_struct.py: GenerateReqInput (the request fields the trainer may send)
GENERATE_REQ_FIELDS = {
    "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data",
    "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "token_ids_logprob", "return_text_in_logprobs", "stream", "log_metrics",
    "return_hidden_states", "lora_path", "custom_logit_processor", "rid", "session_id",
}
# sglang/srt/sampling/sampling_params.py: SamplingParams fields
SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "beam_width", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos",
    "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval",
    "logit_bias", "sampling_seed", "custom_params", "watermark",
}
TOP_K_ALL = 1 << 30
# io_struct.py: UpdateWeightFromDiskReqInput (kw_only; model_path required)
UPDATE_FROM_DISK_FIELDS = {"model_path": str, "load_format": str, "abort_all_requests": bool,
                           "weight_version": str, "is_async": bool, "torch_empty_cache": bool,
                           "keep_pause": bool, "recapture_cuda_graph": bool, "token_step": int,
                           "flush_cache": bool, "manifest": dict}


def sglang_accepts(req: dict, vocab_size: int = VOCAB) -> None:
    """GenerateReqInput(**req) and SamplingParams(**sampling_params).verify(vocab_size) as
    SGLang 0.5.23 runs them (transcribed; the real classes when they import)."""
    try:
        from sglang.srt.managers.io_struct import GenerateReqInput  # noqa: F401
        from sglang.srt.sampling.sampling_params import SamplingParams
    except Exception:  # noqa: BLE001 - not importable on CPU without its dependencies
        GenerateReqInput = None
    if GenerateReqInput is not None:
        GenerateReqInput(**req)
        SamplingParams(**req["sampling_params"]).verify(vocab_size)
        return
    unknown = set(req) - GENERATE_REQ_FIELDS
    assert not unknown, unknown
    ids = req["input_ids"]  # validate_optional_list_i64_1d_2d: ints, 1-D or 2-D
    rows = ids if ids and isinstance(ids[0], list) else [ids]
    assert all(type(t) is int and -(2**63) <= t < 2**63 for r in rows for t in r)
    assert isinstance(req.get("return_logprob", False), bool)
    assert type(req.get("logprob_start_len", -1)) is int
    sp = dict(req["sampling_params"])
    assert not set(sp) - SAMPLING_FIELDS, set(sp) - SAMPLING_FIELDS
    # __post_init__ then verify()
    temperature, top_k = sp.get("temperature", 1.0), sp.get("top_k", TOP_K_ALL)
    if 0 <= temperature < 1e-6:
        temperature, top_k = 1.0, 1
    if top_k == -1:
        top_k = TOP_K_ALL
    assert math.isfinite(temperature) and temperature >= 0
    assert 0 < sp.get("top_p", 1.0) <= 1
    assert not (top_k < 1 or top_k == -1)
    assert sp.get("max_new_tokens", 128) >= 0
    assert all(type(t) is int for t in sp.get("stop_token_ids") or [])


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20), (0.0, 1.0, 0),
                                                     (1.0, 1.0, 1)])
def test_every_request_is_one_sglang_accepts(temperature, top_p, top_k):
    params = sc.sampling_params(temperature=temperature, top_p=top_p, top_k=top_k,
                                max_new_tokens=8192, stop_token_ids=(2, 7))
    assert params["top_k"] == (top_k or -1)  # our 0 = off is SGLang's -1
    for req in (sc.generate_request([[1, 2, 3], [4, 5]], params), sc.score_request([[1, 2, 3]])):
        json.loads(json.dumps(req))  # plain JSON
        sglang_accepts(req)
    assert sc.score_request([[1, 2]])["sampling_params"]["max_new_tokens"] == 0
    update = sc.update_weights_request("/shared/w", 7)
    assert update == {"model_path": "/shared/w", "weight_version": "7", "flush_cache": True}
    assert all(isinstance(v, UPDATE_FROM_DISK_FIELDS[k]) for k, v in update.items())


def _sglang_reply(rows, outputs, *, finish=None, version="3", input_logprobs=None):
    """A /generate reply as SGLang 0.5.23 builds it (tokenizer_manager: meta_info, then the
    logprobs as (logprob, token_id, text) tuples, JSON lists on the wire)."""
    out = []
    for i, (row, (ids, lps)) in enumerate(zip(rows, outputs)):
        meta = {"id": f"rid{i}", "finish_reason": (finish or [None] * len(rows))[i] or
                ({"type": "stop", "matched": ids[-1]} if ids and ids[-1] == 2 else
                 {"type": "length", "length": len(ids)}),
                "prompt_tokens": len(row), "weight_version": version, "num_retractions": 0,
                "input_token_logprobs": (input_logprobs or {}).get(i, []),
                "output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, ids)],
                "output_token_logprobs_length": len(ids), "reasoning_tokens": 0,
                "completion_tokens": len(ids), "cached_tokens": 0, "e2e_latency": 0.01}
        out.append({"text": "", "output_ids": list(ids), "meta_info": meta})
    return json.loads(json.dumps(out))


ROWS = [[5, 6, 7], [8, 9]]
GOOD = [([10, 11, 2], [-0.5, -1.0, -0.1]), ([12, 13, 14, 15], [-2.0, -0.2, -0.3, -0.4])]


def _parse(reply, version=3):
    return sc.parse_generation(reply, "http://e:1", ROWS, max_new_tokens=4, stop_token_ids=(2,),
                               vocab_size=100, weight_version=version)


def test_replies_in_sglang_shape_parse():
    got = _parse(_sglang_reply(ROWS, GOOD))
    assert [(g.output_ids, g.logprobs, g.finish_reason) for g in got] == [
        ([10, 11, 2], [-0.5, -1.0, -0.1], "stop"), ([12, 13, 14, 15], [-2.0, -0.2, -0.3, -0.4], "length")]
    # Scoring: input_token_logprobs starts with (None, first id); then log p(id_t | ids < t).
    inputs = {0: [(None, 5, None), (-1.5, 6, None), (-0.25, 7, None)], 1: [(None, 8, None), (-3.0, 9, None)]}
    reply = _sglang_reply(ROWS, [([], []), ([], [])], input_logprobs=inputs,
                          finish=[{"type": "length", "length": 0}] * 2)
    assert sc.parse_scores(reply, "http://e:1", ROWS) == [[-1.5, -0.25], [-3.0]]


def _mutated(kind):
    reply = _sglang_reply(ROWS, GOOD)
    m = reply[1]["meta_info"]
    if kind == "empty row":
        m["output_token_logprobs"], reply[1]["output_ids"] = [], []
    elif kind == "long row":
        m["output_token_logprobs"].append([-0.1, 16, None])
        reply[1]["output_ids"].append(16)
    elif kind == "short row":
        m["output_token_logprobs"].pop()
        reply[1]["output_ids"].pop()
    elif kind == "positive log-prob":
        m["output_token_logprobs"][0][0] = 0.5
    elif kind == "NaN log-prob":
        m["output_token_logprobs"][0][0] = float("nan")
    elif kind == "inf log-prob":
        m["output_token_logprobs"][0][0] = float("-inf")
    elif kind == "missing rows":
        reply = reply[:1]
    elif kind == "no meta_info":
        del reply[1]["meta_info"]
    elif kind == "no log-probs":
        del m["output_token_logprobs"]
    elif kind == "id out of vocabulary":
        m["output_token_logprobs"][0][1] = 100
        reply[1]["output_ids"][0] = 100
    elif kind == "wrong step":
        m["weight_version"] = "2"
    elif kind == "aborted":
        m["finish_reason"] = {"type": "abort", "message": "x"}
    elif kind == "stop in the middle":
        m["output_token_logprobs"][1][1] = 2
        reply[1]["output_ids"][1] = 2
    return json.loads(json.dumps(reply))


@pytest.mark.parametrize("kind,pattern", [
    ("empty row", "0 generated tokens"), ("long row", "5 generated tokens"),
    ("short row", "finish_reason length after 3 of 4"), ("positive log-prob", "log-prob 0.5"),
    ("NaN log-prob", "log-prob nan"), ("inf log-prob", "log-prob -inf"),
    ("missing rows", "1 rows for 2 rows sent"), ("no meta_info", "no meta_info"),
    ("no log-probs", "no meta_info.output_token_logprobs"), ("id out of vocabulary", "token id 100"),
    ("wrong step", "weight_version '2', expected '3'"), ("aborted", "finish_reason"),
    ("stop in the middle", "stop token 2 at position 1")])
def test_a_wrong_reply_is_one_line_naming_the_url(kind, pattern):
    with pytest.raises(sc.EngineError, match=pattern) as e:
        _parse(_mutated(kind))
    assert str(e.value).startswith("http://e:1: ") and "\n" not in str(e.value)


def test_wrong_scores_are_refused():
    inputs = {0: [(None, 5, None), (-1.5, 6, None), (-0.25, 7, None)], 1: [(None, 8, None), (-3.0, 9, None)]}
    def entry(r, row, j):
        return r[row]["meta_info"]["input_token_logprobs"][j]

    for change, pattern in [(lambda r: r[0]["meta_info"]["input_token_logprobs"].pop(),
                             "2 input log-probs for 3"),
                            (lambda r: entry(r, 1, 1).__setitem__(1, 4), "input token 1 is 4"),
                            (lambda r: entry(r, 1, 1).__setitem__(0, 1e-3), "log-prob 0.001")]:
        reply = _sglang_reply(ROWS, [([], []), ([], [])], input_logprobs=inputs)
        change(reply)
        with pytest.raises(sc.EngineError, match=pattern):
            sc.parse_scores(reply, "http://e:1", ROWS)


# ====================================================================== misbehaving servers
class _Bad(BaseHTTPRequestHandler):
    mode = "ok"

    def do_GET(self):  # noqa: N802
        self._send({"weight_version": "3"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rows = body["input_ids"]
        mode = self.server.mode
        if mode == "slow":
            time.sleep(3)
        if mode == "malformed":
            return self._raw(b"{not json")
        outs = [([10, 2], [-0.1, -0.2]) for _ in rows]
        if mode == "short":
            outs = [([], []) for _ in rows]
        reply = _sglang_reply(rows, outs, version="2" if mode == "wrong step" else "3")
        if mode == "positive":
            reply[0]["meta_info"]["output_token_logprobs"][0][0] = 3.0
        if mode == "nan":
            reply[0]["meta_info"]["output_token_logprobs"][0][0] = float("nan")
        self._send(reply)

    def _send(self, payload):
        self._raw(json.dumps(payload).encode())

    def _raw(self, body):
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *a):
        pass


@pytest.fixture
def bad_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bad)
    server.daemon_threads = True
    server.mode = "ok"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _client(url, timeout=1.0, retries=1, should_stop=None):
    return sc.SGLangClient(sc.ClientOptions(urls=(url,), timeout=timeout, retries=retries, backoff=0.05),
                           should_stop=should_stop)


def _generate(client):
    return client.generate([[1, 2, 3]], temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4,
                           stop_token_ids=[2], vocab_size=VOCAB, weight_version=3)


@pytest.mark.parametrize("mode,pattern", [("malformed", "not JSON"), ("short", "0 generated tokens"),
                                          ("positive", "log-prob 3.0"), ("nan", "log-prob nan"),
                                          ("wrong step", "weight_version '2', expected '3'"),
                                          ("slow", "no answer within the timeout")])
def test_a_misbehaving_server_is_named_in_one_line(bad_server, mode, pattern):
    bad_server.mode = mode
    url = f"http://127.0.0.1:{bad_server.server_address[1]}"
    start = time.monotonic()
    with pytest.raises(sc.EngineError, match=pattern) as e:
        _generate(_client(url))
    assert str(e.value).startswith(url) and "\n" not in str(e.value)
    assert time.monotonic() - start < 2 * 1.0 + 0.05 + 2.0  # (retries + 1) x timeout + backoff


def test_a_server_that_is_down_or_only_accepts_is_named_within_the_timeout():
    idle = socket.socket()
    idle.bind(("127.0.0.1", 0))
    idle.listen(8)  # accepts connections (the kernel does), never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down_port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    try:
        for port, pattern in [(down_port, "ConnectionRefusedError"),
                              (idle.getsockname()[1], "no answer within the timeout")]:
            url = f"http://127.0.0.1:{port}"
            start = time.monotonic()
            with pytest.raises(sc.EngineError, match=pattern) as e:
                _client(url, timeout=0.5, retries=1).health()
            assert str(e.value).startswith(url) and "2 tries" in str(e.value)
            assert time.monotonic() - start < 2 * 0.5 + 0.05 + 1.5
    finally:
        idle.close()


def test_sigterm_ends_a_hung_wait_at_once(bad_server):
    from megatron_ext.trainer import StopSignal

    bad_server.mode = "slow"
    url = f"http://127.0.0.1:{bad_server.server_address[1]}"
    stop = StopSignal()
    try:
        client = _client(url, timeout=30, retries=2, should_stop=lambda: stop.received)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        start = time.monotonic()
        with pytest.raises(sc.Interrupted, match=f"signal 15 while waiting on rollout engine {url}"):
            _generate(client)
        assert time.monotonic() - start < 5  # not the 30 s timeout
    finally:
        stop.restore()


def test_requests_are_spread_over_the_urls(bad_server):
    second = ThreadingHTTPServer(("127.0.0.1", 0), _Bad)
    second.mode = "ok"
    threading.Thread(target=second.serve_forever, daemon=True).start()
    seen = []
    try:
        urls = tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in (bad_server, second))
        client = sc.SGLangClient(sc.ClientOptions(urls=urls, timeout=2, rows_per_request=2))
        orig = client._start
        client._start = lambda url, *a: (seen.append(url), orig(url, *a))[1]
        out = client.generate([[1, 2]] * 7, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4,
                              stop_token_ids=[2], vocab_size=VOCAB)
        assert len(out) == 7 and seen == [urls[0], urls[1], urls[0], urls[1]]
    finally:
        second.shutdown()
        second.server_close()


# ====================================================================== tools/serve_teacher.py
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from helpers_hf import make_dense_qwen3

    from megatron_ext.convert.tokenizer_export import sentencepiece_to_hf

    root = tmp_path_factory.mktemp("served")
    model_dir = root / "tiny-hf"
    make_dense_qwen3(str(model_dir), seed=3, vocab_size=VOCAB, max_position_embeddings=64)
    sentencepiece_to_hf(str(REPO / "data/tokenizer/marco_tiny_spm.model"), str(model_dir))
    serve = load_tool("serve_teacher")
    model = serve.Model(str(model_dir), dtype="fp32", batch_size=4)
    server = serve.make_server(model, "127.0.0.1", 0, socket_timeout=1.0, max_body_bytes=20000,
                               max_rows=8, update_root=str(root / "updates"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "port": server.server_address[1],
           "model": model, "serve": serve, "root": root}
    server.shutdown()
    server.server_close()


def _post(port, route, body: bytes, headers=None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", route, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def _gen(ids, **sp):
    return json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 2, **sp},
                       "return_logprob": True}).encode()


BAD_REQUESTS = [
    (b"{not json", "not JSON"),
    (json.dumps([1, 2]).encode(), "JSON object"),
    (_gen([[-1, 5]]), "token id must be an integer in [0, 8191], got -1"),
    (_gen([[8192]]), "got 8192"),
    (_gen([[1.5]]), "got 1.5"),
    (_gen([[]]), "non-empty list"),
    (_gen([[1]] * 9), "9 rows, more than --max-rows 8"),
    (_gen([[1] * 63]), "exceed the model's 64 positions"),
    (b'{"input_ids": [[1]], "sampling_params": {"temperature": NaN, "max_new_tokens": 2}}',
     "temperature must be a finite number"),
    (b'{"input_ids": [[1]], "sampling_params": {"temperature": Infinity, "max_new_tokens": 2}}',
     "finite number, got inf"),
    (_gen([[1]], temperature=-1), "temperature must be >= 0"),
    (_gen([[1]], top_p=0), "top_p must be in (0, 1]"),
    (_gen([[1]], top_k=0), "top_k (-1 = off)"),
    (_gen([[1]], stop_token_ids=[99999]), "stop_token_ids"),
    (_gen([[1]], max_new_tokens=-3), "max_new_tokens must be an integer"),
    (_gen([[1]], frequency_penalty=1.0), "'frequency_penalty' is not served"),
    (json.dumps({"text": "hello"}).encode(), "give input_ids"),
    (b"x" * 20001, "more than --max-body-bytes 20000"),
]


@pytest.mark.parametrize("body,reason", BAD_REQUESTS, ids=[r for _, r in BAD_REQUESTS])
def test_a_bad_request_is_a_400_with_one_line_and_the_server_keeps_serving(served, body, reason):
    status, data = _post(served["port"], "/generate", body)
    assert status == 400
    error = json.loads(data)["error"]
    assert reason in error and "\n" not in error and "Traceback" not in error
    client = _client(served["url"], timeout=10)
    assert len(client.score([[1, 2, 3]])[0]) == 2  # still serving


def test_weight_updates_only_from_under_the_update_root(served, tmp_path):
    status, data = _post(served["port"], "/update_weights_from_disk",
                         json.dumps({"model_path": str(tmp_path), "weight_version": "1"}).encode())
    assert status == 400 and "not under the server's --update-root" in json.loads(data)["error"]
    status, data = _post(served["port"], "/update_weights_from_disk",
                         json.dumps({"model_path": str(served["root"] / "updates" / "none")}).encode())
    assert status == 400 and "no config.json" in json.loads(data)["message"]


def test_model_info_discloses_no_absolute_path(served):
    info = _client(served["url"]).model_info()[0]
    assert info["model_path"] == "tiny-hf" and info["tokenizer_path"] == "tiny-hf"
    assert not any(isinstance(v, str) and os.sep in v for k, v in info.items())
    assert info["vocab_size"] == VOCAB and info["max_positions"] == 64 and len(info["token_map"]) == VOCAB


def test_an_idle_connection_holds_up_no_other_client(served):
    """With a 3 s socket timeout: another client is answered before it runs out, and the idle
    connection is closed once it has."""
    server = served["serve"].make_server(served["model"], "127.0.0.1", 0, socket_timeout=3.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    idle = socket.create_connection(("127.0.0.1", port))
    try:
        idle.sendall(b"POST /generate HTTP/1.1\r\n")  # then nothing more
        start = time.monotonic()
        assert len(_client(f"http://127.0.0.1:{port}", timeout=10).score([[1, 2, 3]])) == 1
        assert time.monotonic() - start < 3.0  # not after the idle one's socket timeout
        idle.settimeout(10)
        assert idle.recv(100) == b""  # closed by the server's socket timeout
        assert time.monotonic() - start < 8.0
    finally:
        idle.close()
        server.shutdown()
        server.server_close()


def test_generation_is_greedy_and_batched_like_the_model(served):
    import torch

    model = served["model"]
    client = _client(served["url"], timeout=30)
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    out = client.generate(rows, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=3,
                          stop_token_ids=[], vocab_size=VOCAB)
    for row, g in zip(rows, out):  # each row alone, recomputed without a cache
        ids = list(row)
        for t, lp in zip(g.output_ids, g.logprobs):
            with torch.no_grad():
                logits = model.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            want = float(torch.log_softmax(logits, -1)[t])
            assert t == int(logits.argmax()) and lp == pytest.approx(want, abs=1e-4)
            ids.append(t)
        assert g.finish_reason == "length"


def test_defaults_loopback_and_a_port_in_use_is_one_line(served):
    serve = served["serve"]
    assert serve.build_parser().parse_args(["--model", "m"]).host == "127.0.0.1"
    with pytest.raises(serve.UsageError, match=f"--port {served['port']}: cannot listen") as e:
        serve.make_server(served["model"], "127.0.0.1", served["port"])
    assert "\n" not in str(e.value)


def test_a_shared_secret_is_checked_by_both_sides(served, monkeypatch):
    serve = served["serve"]
    server = serve.make_server(served["model"], "127.0.0.1", 0, api_key="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, data = _post(server.server_address[1], "/generate", _gen([[1]]))
        assert status == 401 and "unauthorized" in json.loads(data)["error"]
        with pytest.raises(sc.EngineError, match="HTTP 401"):
            _client(url).score([[1, 2]])
        monkeypatch.setenv(sc.API_KEY_ENV, "s3cret")
        assert len(_client(url).score([[1, 2]])[0]) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_queued_requests_are_served_in_one_batch(served, monkeypatch):
    """Requests that arrive while the model is busy run together: one forward pass for the
    rows of both, each answered with its own rows' log-probs."""
    serve, model = served["serve"], served["model"]
    engine = serve.Engine(model)
    server = serve.make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    calls, real = [], model.score
    monkeypatch.setattr(model, "score", lambda rows: (calls.append(len(rows)), real(rows))[1])
    submitted, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a: (submitted.append(a[0]), submit(*a))[1])
    results = {}

    def ask(name, rows):
        results[name] = _client(url, timeout=30).score(rows)

    try:
        with model.lock:  # the model is busy: A waits for it, B and C queue behind
            threads = [threading.Thread(target=ask, args=("a", [[1, 2, 3]]))]
            threads[0].start()
            deadline = time.monotonic() + 10
            while (not submitted or engine.jobs.qsize()) and time.monotonic() < deadline:
                time.sleep(0.01)  # A queued, then taken by the model thread
            for name, rows in (("b", [[4, 5, 6]]), ("c", [[7, 8], [9, 10, 11]])):
                threads.append(threading.Thread(target=ask, args=(name, rows)))
                threads[-1].start()
            while engine.jobs.qsize() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        for t in threads:
            t.join(30)
        assert calls == [1, 3]  # A alone, then B and C together
        alone = _client(url, timeout=30).score([[4, 5, 6], [7, 8], [9, 10, 11]])
        assert results["b"] + results["c"] == alone and len(results["a"]) == 1
    finally:
        server.shutdown()
        server.server_close()
