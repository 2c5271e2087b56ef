"""OPD's loss as slime computes it (megatron_ext/posttrain/losses.py, opd.py's loss function).

The reference here is an independent plain-PyTorch transcription of slime's formulas (THUDM/slime
at 624b824: `utils/ppo_utils.py: compute_policy_loss`, `backends/megatron_utils/loss.py:
policy_loss_function, vanilla_tis_function, apply_opd_kl_to_advantages, loss_function`,
`backends/megatron_utils/cp_utils.py: get_sum_of_sample_mean`), on per-response lists in
float64, as slime holds them: advantage -c (old - teacher), ratio exp(lp - old), the max of the
plain and clipped surrogate, the TIS weight clamp(exp(old - rollout), low, high), then per
response sum(x * mask) / mask.sum() summed and divided by the global batch's responses
(`* num_microbatches / step_global_batch_size * dp`, Megatron then divides by the
micro-batches and DDP averages over DP), or the token sum over the global batch's tokens
(--calculate-per-token-loss). Ours runs the trainer's loss function on collated micro-batches
(response weights fixed once for the step) and the trainer's token-mean over the global batch.

- sample-mean and token-mean, clip ranges with ratios above and below them (eps_clip_high
  unset and set), TIS on and off: loss and gradient equal the reference, on random rollouts of
  uneven lengths, with one micro-batch and with two of different compositions.
- One optimizer step per rollout (old = sg(current)) and token-mean: the value and gradient of
  the previous plain policy-gradient loss, c (s - t) and c (s - t) grad s.
- The entropy on the response tokens, its coefficient, and the reports.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.posttrain import losses

V = 11


# ====================================================================== slime, transcribed
def slime_loss(logprobs, old, teacher, rollout, masks, *, reduction, kl_coef=1.0, eps_clip=0.2,
               eps_clip_high=None, use_tis=False, tis_clip=2.0, tis_clip_low=0.0,
               entropy=None, entropy_coef=0.0):
    """Per-response lists (float64) -> the step's loss, as slime's code computes it."""
    eps_clip_high = eps_clip if eps_clip_high is None else eps_clip_high  # arguments.py
    # apply_opd_kl_to_advantages: task reward 0 (grpo base advantage 0), minus c x reverse KL of
    # the log-probs the actor recomputed at the rollout (old) and the teacher's.
    advantages = torch.cat([-kl_coef * (o - t) for o, t in zip(old, teacher)])
    log_probs, old_log_probs = torch.cat(logprobs), torch.cat(old)
    ppo_kl = old_log_probs - log_probs
    ratio = (-ppo_kl).exp()  # compute_policy_loss
    pg_losses1 = -ratio * advantages
    pg_losses2 = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * advantages
    pg_loss = torch.maximum(pg_losses1, pg_losses2)
    if use_tis:  # vanilla_tis_function
        tis = torch.exp(old_log_probs - torch.cat(rollout))
        pg_loss = pg_loss * torch.clamp(tis, min=tis_clip_low, max=tis_clip)
    lengths = [len(m) for m in masks]

    def sum_of_sample_mean(x):  # get_sum_of_sample_mean, cp_size 1
        return sum((x_i * m).sum() / torch.clamp_min(m.sum(), 1)
                   for x_i, m in zip(x.split(lengths), masks))

    def sum_of_token(x):
        return sum((x_i * m).sum() for x_i, m in zip(x.split(lengths), masks))

    reducer = sum_of_token if reduction == "token-mean" else sum_of_sample_mean
    loss = reducer(pg_loss)
    if entropy is not None:
        loss = loss - entropy_coef * reducer(torch.cat(entropy))
    # loss_function's rescaling, then Megatron's: per-sample mean over the global batch's
    # responses; per-token over its tokens.
    if reduction == "token-mean":
        return loss / sum(torch.clamp_min(m.sum(), 1) for m in masks)
    return loss / len(masks)


# ====================================================================== our side
def _fake_task(reduction, policy, entropy_coef=0.0, temperature=1.0):
    from megatron_ext.posttrain.opd import OPDTask, PhaseSettings
    from megatron_ext.posttrain.rollout import RolloutSettings

    task = OPDTask.__new__(OPDTask)
    task.settings = PhaseSettings(RolloutSettings(temperature=temperature), "sampled-rkl",
                                  policy.kl_coef, 0.5, reduction, policy, entropy_coef)
    task.tok = type("Tok", (), {"vocab_size": V})()
    task.tp = 1
    task.opts = type("Opts", (), {"chunk_tokens": 4})()
    return task


def _rollout(seed=0, lengths=((4, 1), (2, 7), (5, 3), (3, 12), (6, 2)), spread=0.6):
    """Responses of uneven lengths with per-sample logits (leaves) and the log-probs slime's
    batch carries: teacher, old (the current ones moved so that ratios fall on both sides of
    the clip range) and the sampler's."""
    from megatron_ext.posttrain.rollout import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for row, (p, r) in enumerate(lengths):
        prompt = torch.randint(0, V, (p,), generator=g).tolist()
        response = torch.randint(0, V, (r,), generator=g).tolist()
        logits = (2 * torch.randn(p + r, V, generator=g, dtype=torch.float64)).requires_grad_()
        targets = torch.tensor(prompt[1:] + response)
        current = torch.log_softmax(logits.detach(), -1)[p - 1:p + r - 1].gather(
            -1, targets[p - 1:, None])[:, 0]
        old = current + spread * (2 * torch.rand(r, generator=g, dtype=torch.float64) - 1)
        teacher = -3 * torch.rand(r, generator=g, dtype=torch.float64)
        sampler = old + 0.8 * (2 * torch.rand(r, generator=g, dtype=torch.float64) - 1)
        sample = Sample(row, prompt, response, sampler.float().tolist(), "length",
                        teacher.float().tolist(), old.float().tolist())
        out.append({"sample": sample, "logits": logits, "p": p, "r": r, "old": old.float().double(),
                    "teacher": teacher.float().double(), "sampler": sampler.float().double()})
    return out


def _ours(task, data, micro_batches, with_old=True):
    """The trainer's view: micro-batches collated, weights from the step's totals, the loss
    function per micro-batch, summed and divided by the step's response tokens."""
    from megatron_ext.posttrain import rollout

    tokens = float(sum(d["r"] for d in data))
    loss, count = 0.0, 0
    reports = []
    for rows in micro_batches:
        samples = [data[i]["sample"] for i in rows]
        if not with_old:
            samples = [type(s)(**{**s.__dict__, "old_logprobs": None}) for s in samples]
        batch = rollout.collate(samples, pad_id=0)
        w = losses.response_weights(batch["loss_mask"].sum(1), tokens, len(data),
                                    task.settings.reduction)
        batch["loss_weights"] = batch["loss_mask"] * w[:, None]
        width = batch["tokens"].shape[1]
        logits = torch.stack([torch.cat([data[i]["logits"],
                                         torch.zeros(width - len(data[i]["logits"]), V,
                                                     dtype=torch.float64)]) for i in rows])
        total, n, report = task._loss(batch, None, logits)
        loss, count = loss + total, count + int(n)
        reports.append(report)
    assert count == tokens
    return loss / count, reports


def _reference(data, **kw):
    lp = [torch.log_softmax(d["logits"], -1)[d["p"] - 1:d["p"] + d["r"] - 1].gather(
        -1, torch.tensor(d["sample"].output_ids)[:, None])[:, 0] for d in data]
    masks = [torch.ones(d["r"], dtype=torch.float64) for d in data]
    return slime_loss(lp, [d["old"] for d in data], [d["teacher"] for d in data],
                      [d["sampler"] for d in data], masks, **kw)


def _grads(loss, data):
    return torch.autograd.grad(loss, [d["logits"] for d in data])


@pytest.mark.parametrize("reduction", ["sample-mean", "token-mean"])
@pytest.mark.parametrize("eps_clip_high,use_tis", [(None, False), (0.28, False), (None, True),
                                                   (0.28, True)])
def test_loss_and_gradient_equal_slime_on_uneven_rollouts(reduction, eps_clip_high, use_tis):
    data = _rollout()
    policy = losses.PolicyLoss(kl_coef=0.7, eps_clip=0.2, eps_clip_high=eps_clip_high,
                               use_tis=use_tis, tis_clip=1.5, tis_clip_low=0.5)
    task = _fake_task(reduction, policy)
    want = _reference(data, reduction=reduction, kl_coef=0.7, eps_clip=0.2,
                      eps_clip_high=eps_clip_high, use_tis=use_tis, tis_clip=1.5, tis_clip_low=0.5)
    want_grads = _grads(want, data)
    # The case is a real one: ratios below, inside and above the clip range; TIS weights clipped.
    ratio = torch.cat([torch.exp(torch.log_softmax(d["logits"].detach(), -1)[d["p"] - 1:d["p"] + d["r"] - 1]
                                 .gather(-1, torch.tensor(d["sample"].output_ids)[:, None])[:, 0] - d["old"])
                       for d in data])
    high = 1 + (eps_clip_high or 0.2)
    assert (ratio < 0.8).any() and (ratio > high).any() and ((ratio > 0.8) & (ratio < high)).any()
    for micro_batches in ([[0, 1, 2, 3, 4]], [[3, 0], [1, 4, 2]], [[4], [2, 3, 1, 0]]):
        got, reports = _ours(task, data, micro_batches)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
        for g, w in zip(_grads(got, data), want_grads):
            torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5)
        # The "opd loss" report is the loss itself; the clip fraction is counted.
        report = sum(r["opd loss"] for r in reports)
        assert (report[0] / report[1]).item() == pytest.approx(got.item(), rel=1e-6)
        clip = sum(r["clipfrac"] for r in reports)
        assert 0 < clip[0] < clip[1]


def test_the_two_reductions_differ_and_weigh_responses_as_documented():
    """Sample-mean weighs each response the same, token-mean each token: with lengths 1 and 12
    the one-token answer moves the first 12x as much (a check that the test can fail)."""
    data = _rollout()
    kw = dict(reduction="sample-mean")
    a = _ours(_fake_task("sample-mean", losses.PolicyLoss()), data, [[0, 1, 2, 3, 4]])[0]
    b = _ours(_fake_task("token-mean", losses.PolicyLoss()), data, [[0, 1, 2, 3, 4]])[0]
    assert abs(a.item() - b.item()) > 1e-3
    w = losses.response_weights(torch.tensor([1, 12]), 13.0, 2.0, "sample-mean")
    assert w.tolist() == pytest.approx([13 / 2, 13 / 24])
    assert _reference(data, **kw).item() == pytest.approx(a.item(), rel=1e-6)


@pytest.mark.parametrize("reduction", ["sample-mean", "token-mean"])
def test_one_step_per_rollout_is_the_plain_policy_gradient(reduction):
    """old = sg(current) (no old log-probs in the batch): ratio 1, clip inactive, and the loss
    is today's c (s - t) with gradient c (s - t) grad s, reduced as asked."""
    data = _rollout(seed=3)
    c = 0.5
    task = _fake_task(reduction, losses.PolicyLoss(kl_coef=c))
    got, reports = _ours(task, data, [[0, 2], [1, 3, 4]], with_old=False)
    per = []
    for d in data:
        s = torch.log_softmax(d["logits"], -1)[d["p"] - 1:d["p"] + d["r"] - 1].gather(
            -1, torch.tensor(d["sample"].output_ids)[:, None])[:, 0]
        per.append((c * (s.detach() - d["teacher"]), c * (s.detach() - d["teacher"]) * s))
    if reduction == "token-mean":
        n = sum(d["r"] for d in data)
        value = sum(v.sum() for v, _ in per) / n
        surrogate = sum(g.sum() for _, g in per) / n
    else:
        value = sum(v.mean() for v, _ in per) / len(data)
        surrogate = sum(g.mean() for _, g in per) / len(data)
    torch.testing.assert_close(got.double(), value, atol=1e-6, rtol=1e-6)
    for g, w in zip(_grads(got, data), _grads(surrogate, data)):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5)
    assert sum(r["clipfrac"] for r in reports)[0] == 0
    # And the per-token function the old code called gives the same values.
    s = torch.tensor([-1.0, -2.0]).requires_grad_()
    t = torch.tensor([-0.5, -3.0])
    plain = losses.sampled_rkl(s, t, c)
    torch.testing.assert_close(plain.detach(), c * (s.detach() - t))
    (grad,) = torch.autograd.grad(plain.sum(), s)
    torch.testing.assert_close(grad, c * (s.detach() - t))


def test_entropy_is_reported_and_its_coefficient_enters_the_loss():
    data = _rollout(seed=5)
    coef = 0.3
    base = _fake_task("sample-mean", losses.PolicyLoss())
    with_h = _fake_task("sample-mean", losses.PolicyLoss(), entropy_coef=coef)
    a, reports = _ours(base, data, [[0, 1, 2, 3, 4]])
    b, _ = _ours(with_h, data, [[0, 1, 2, 3, 4]])
    ent = []
    for d in data:
        s = torch.log_softmax(d["logits"], -1)[d["p"] - 1:d["p"] + d["r"] - 1]
        ent.append(-(s.exp() * s).sum(-1))
    report = sum(r["entropy"] for r in reports)
    assert (report[0] / report[1]).item() == pytest.approx(torch.cat(ent).mean().item(), rel=1e-5)
    masks = [torch.ones(d["r"], dtype=torch.float64) for d in data]
    lp = [torch.log_softmax(d["logits"], -1)[d["p"] - 1:d["p"] + d["r"] - 1].gather(
        -1, torch.tensor(d["sample"].output_ids)[:, None])[:, 0] for d in data]
    want = slime_loss(lp, [d["old"] for d in data], [d["teacher"] for d in data],
                      [d["sampler"] for d in data], masks, reduction="sample-mean",
                      entropy=ent, entropy_coef=coef)
    torch.testing.assert_close(b.double(), want, atol=1e-6, rtol=1e-6)
    for g, w in zip(_grads(b, data), _grads(want, data)):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5)
    assert a.item() - b.item() == pytest.approx(coef * sum(h.mean() for h in ent).item() / 5, rel=1e-5)
