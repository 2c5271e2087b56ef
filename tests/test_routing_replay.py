"""Routing replay (megatron_ext/posttrain/routing_replay.py, OPD's --routing-replay).

- The generator's record: the prefill's experts per prompt token are what the routers chose in
  that forward (a forward hook on every router), and the decode steps' line up with the tokens
  (a training forward without replay agrees on almost all of them; misaligned positions would
  agree by chance only).
- The training forward with replay uses exactly the recorded experts for every recorded token
  (the hook on every router), and the router's own choice for the rest (each row's last token,
  padding); the router's probabilities stay differentiable.
- An OPD run with --routing-replay trains, logs the sampling/training log-prob gap, and a
  served rollout engine or a dense student is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from test_opd import _records, _run_opd, fresh_module_tracker, teachers  # noqa: F401, F811

from megatron_ext.errors import ConfigError

VOCAB = 8192


@pytest.fixture(scope="module")
def student(teachers):  # noqa: F811
    from megatron_ext.inference.loading import load_model_from_checkpoint

    return load_model_from_checkpoint(teachers["student"][1])[0]


class _RouterHook:
    """What every router of `model` chose, per call: [tokens, experts] routing maps."""

    def __init__(self, model):
        from megatron.core.transformer.moe.router import TopKRouter

        self.calls: list[list[torch.Tensor]] = []  # per router
        self.handles = []
        for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
            seen: list[torch.Tensor] = []
            self.calls.append(seen)
            self.handles.append(router.register_forward_hook(
                lambda mod, args, out, seen=seen: seen.append(out[1].detach().cpu())))

    def close(self):
        for h in self.handles:
            h.remove()


def _experts(routing_map: torch.Tensor) -> list[set]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in routing_map]


def test_recorded_experts_are_the_ones_used(student):
    from megatron_ext.inference.generation import SamplingParams, generate
    from megatron_ext.posttrain.rollout import Sample, collate
    from megatron_ext.posttrain.routing_replay import RoutingReplay

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 3, 8)]
    greedy = generate(student, prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    # Stop tokens that end two rows early (compaction drops them from the cache mid-way).
    params = SamplingParams(max_new_tokens=8, temperature=0.0,
                            stop_ids=(greedy[0].output_ids[2], greedy[1].output_ids[4]))
    rows = [10, 11, 12, 13]
    replay = RoutingReplay(student)
    hook = _RouterHook(student)
    try:
        with replay.recording() as record:
            out = generate(student, prompts, params, seed=3, indices=rows, routing=record)
        prefill = [calls[0] for calls in hook.calls]  # each router's first call
        samples = [Sample(r, o.prompt_ids, o.output_ids, o.logprobs, o.finish_reason,
                          routing=record.routing(r, len(o.prompt_ids) + len(o.output_ids)))
                   for r, o in zip(rows, out)]
        assert any(s.finish_reason == "stop" and len(s.output_ids) < 8 for s in samples)
        # The prefill's record is what the routers chose then (the generator's rows longest
        # first, left-padded, tokens sequence-major).
        width = max(len(p) for p in prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for layer, chosen in enumerate(prefill):
            chosen = chosen.view(width, len(prompts), -1)
            for column, i in enumerate(order):
                s = samples[i]
                n = len(s.prompt_ids)
                want = _experts(chosen[width - n:, column])
                got = [set(x.tolist()) for x in s.routing[:n, layer]]
                assert got == want, (layer, i)
        batch = collate(samples, pad_id=0)
        # Each sample's last token was never fed back: nothing recorded there, nor on padding.
        recorded = batch["routing"][..., 0, 0] >= 0
        for i, s in enumerate(samples):
            assert recorded[i, :s.length - 1].all() and not recorded[i, s.length:].any()

        def training_forward(with_replay: bool):
            for calls in hook.calls:
                calls.clear()
            replay.replay(batch["routing"] if with_replay else None)
            logits = student(batch["tokens"], batch["position_ids"], None)
            replay.off()
            # [s * b] tokens, sequence-major -> [b, s]
            return logits, [calls[0].view(batch["tokens"].shape[1], len(samples), -1).transpose(0, 1)
                            for calls in hook.calls]

        own_logits, own = training_forward(False)
        logits, used = training_forward(True)
        agree = total = 0
        for layer in range(len(used)):
            for i in range(len(samples)):
                for t in range(batch["tokens"].shape[1]):
                    got = set(torch.nonzero(used[layer][i, t]).flatten().tolist())
                    if recorded[i, t]:
                        assert got == set(batch["routing"][i, t, layer].tolist()), (layer, i, t)
                        mine = set(torch.nonzero(own[layer][i, t]).flatten().tolist())
                        agree, total = agree + (mine == got), total + 1
                    else:  # the router's own choice
                        assert got == set(torch.nonzero(own[layer][i, t]).flatten().tolist())
        # Without replay the training forward mostly routes as recorded: positions line up.
        assert agree / total > 0.9, (agree, total)
        assert logits.requires_grad
        # Where the routing agrees everywhere the logits are those of the plain forward.
        if agree == total:
            torch.testing.assert_close(logits, own_logits, atol=1e-5, rtol=1e-5)
    finally:
        hook.close()
        replay.off()


BASE = ["--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "6",
        "--seed", "11", "--log-interval", "100", "--rollout-max-prompt-len", "48",
        "--adam-eps", "1e-6", "--lr", "1e-3", "--train-iters", "2"]


def test_opd_with_routing_replay_trains_and_logs_the_gap(teachers, tmp_path, fresh_module_tracker):  # noqa: F811
    logs = {}
    for name, extra in (("plain", []), ("replay", ["--routing-replay"])):
        log = tmp_path / f"{name}.jsonl"
        _run_opd("--teacher", teachers["moe30b"][1], "--load", teachers["student"][1], *BASE, *extra,
                 "--log-json", str(log))
        logs[name] = _records(log)[0]
    for plain, replay in zip(logs["plain"], logs["replay"], strict=True):
        assert replay["rollout/response_length"] == plain["rollout/response_length"]
        # fp32, one process: the gap is rounding either way, and replay does not widen it.
        assert replay["logprob_diff"] < 1e-3 and plain["logprob_diff"] < 1e-3
        assert replay["opd_loss"] == pytest.approx(plain["opd_loss"], rel=1e-3)


def test_routing_replay_refusals(teachers, tmp_path):  # noqa: F811
    import posttrain_marco
    from megatron_ext.posttrain.opd import opd_options, resolve_opd_args

    parse = posttrain_marco.build_parser().parse_args
    with pytest.raises(ConfigError, match="--routing-replay needs the in-process generator"):
        opd_options(resolve_opd_args(parse(["opd", "--teacher", teachers["moe30b"][1], *BASE,
                                            "--routing-replay", "--rollout-engine", "sglang",
                                            "--rollout-url", "http://127.0.0.1:9",
                                            "--rollout-sync-dir", str(tmp_path)])))
    from megatron_ext.inference.loading import load_model_from_checkpoint
    from megatron_ext.posttrain.routing_replay import RoutingReplay

    dense = load_model_from_checkpoint(teachers["dense"][1])[0]
    with pytest.raises(ConfigError, match="the student has no MoE layers"):
        RoutingReplay(dense)
