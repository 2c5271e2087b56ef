"""On-policy distillation losses, per response token, in fp32.

Notation, per position t of a response sampled from the student: s = log softmax(z_s / T) and
t = log softmax(z_t / T) are the student's and teacher's log-probabilities over the real
vocabulary (logits cut to the tokenizer's size whatever each model pads its embedding to), at
the rollout temperature T; p = exp(s), q = exp(t); y_t the sampled token; sg = stop-gradient.

  sampled-rkl  slime's on-policy distillation, Marco's loss: slime's clipped policy-gradient
               surrogate whose per-token advantage is A = -c * (s_old(y) - t(y)) (c =
               --opd-kl-coef, task reward 0; s_old the log-prob under the policy at the start
               of the rollout, recomputed by the trainer):
                   ratio = exp(s(y) - s_old(y))
                   loss  = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))
               (eps = --eps-clip 0.2, eps_high = --eps-clip-high, default eps), times, with
               --use-tis, the truncated importance weight clip(exp(s_old(y) - s_roll(y)),
               --tis-clip-low 0, --tis-clip 2) against the sampler's log-prob s_roll. With one
               optimizer step per rollout s_old = sg(s), the ratio is 1 and the clip inactive:
               loss = -sg(A) * exp(s(y) - sg(s(y))), value c * (s(y) - t(y)) (the one-sample
               estimate of the per-token reverse KL), gradient c * (s(y) - t(y)) * grad s(y),
               whose expectation over y ~ p is the gradient of c * KL(p || q) (the
               score-function identity: E_p[grad s] = 0). One teacher log-prob per token is
               enough, so the teacher can live in another process.
  rkl          full-vocabulary reverse KL, KL(p || q) = sum p (s - t).
  fkl          full-vocabulary forward KL, KL(q || p) = sum q (t - s).
  jsd          generalised Jensen-Shannon divergence (TRL's GKD): M = beta q + (1 - beta) p,
               JSD = beta KL(q || M) + (1 - beta) KL(p || M); beta = 0 is taken as forward KL
               and beta = 1 as reverse KL (TRL's convention; the mixture formula degenerates
               to 0 there).

Reduction (--opd-loss-reduction), over the global batch's R responses, T_r response tokens
each, N = sum T_r, l the per-token loss:
  sample-mean  (1/R) sum_r (1/T_r) sum_t l   every response weighs the same (slime's default)
  token-mean   (1/N) sum_r sum_t l           every token weighs the same (slime's
                                             --calculate-per-token-loss)
Both are written as per-token weights w = N/(R T_r) or 1, fixed once per optimizer step from the
whole global batch (`response_weights`), and the trainer's token-mean over the global batch
(Megatron's calculate_per_token_loss, denominator N): sum w l / N is the reduction above under
any micro-batching and data-parallel layout, as no denominator is taken per micro-batch.

The student's entropy on the response tokens, H = -sum p s, is computed beside its log-prob
(one softmax); --entropy-coef (0 by default, as slime) subtracts coef x H from the loss.

Everything is computed over chunks of response tokens, each under activation checkpointing:
the [tokens, vocab] fp32 intermediates (log-softmaxes, the mixture, the cross-entropy's
softmax) exist for one chunk at a time, in the forward and again in the backward, so memory
beyond the logits themselves is bounded by --opd-chunk-tokens x vocabulary (at 10k-token
sequences and Qwen3's 151,936 words, an fp32 copy of one sequence's logits is 6 GB).

Under tensor parallelism the student's logits are vocab-parallel: the sampled token's
log-prob uses Megatron's vocab-parallel cross-entropy (no gather), and the full-vocabulary
divergences gather each chunk over the tensor-parallel group (autograd-aware: the backward
splits the gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

LOSSES = ("sampled-rkl", "rkl", "fkl", "jsd")
FULL_VOCAB = ("rkl", "fkl", "jsd")
REDUCTIONS = ("sample-mean", "token-mean")


def needs_teacher_logits(opd_loss: str) -> bool:
    """The one place that says which OPD losses need the teacher's whole-vocabulary logits
    (scored inside the forward step) rather than its log-prob of each sampled token (scored
    once per rollout, before training)."""
    if opd_loss not in LOSSES:
        raise ValueError(f"unknown OPD loss {opd_loss!r}; expected one of {', '.join(LOSSES)}")
    return opd_loss in FULL_VOCAB


# ------------------------------------------------------------------------------ parallel helpers
def _tp() -> tuple[int, int]:
    """(tensor-parallel rank, size); (0, 1) without Megatron's parallel state."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def cut_vocab(logits: torch.Tensor, vocab_size: int, vocab_parallel: bool) -> torch.Tensor:
    """Logits restricted to the first `vocab_size` ids: sliced when the last dimension is the
    whole vocabulary, padded columns set to -inf when it is this rank's vocab-parallel shard."""
    if not vocab_parallel:
        return logits[..., :vocab_size]
    rank, _ = _tp()
    width = logits.shape[-1]
    start = rank * width
    if start + width <= vocab_size:
        return logits
    cols = torch.arange(start, start + width, device=logits.device) >= vocab_size
    return logits.masked_fill(cols, float("-inf"))


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel shards -> the whole vocabulary (autograd-aware)."""
    if _tp()[1] == 1:
        return logits
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


# ------------------------------------------------------------------------------ log-probs
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   vocab_size: Optional[int] = None, vocab_parallel: bool = False) -> torch.Tensor:
    """log softmax(logits / T)[target] in fp32 over the real vocabulary; differentiable.
    `vocab_parallel`: the last dimension is this rank's tensor-parallel shard (Megatron's
    vocab-parallel cross-entropy, no gather)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    elif z is logits:
        z = z.clone()  # Megatron's cross-entropy subtracts the max in place
    if vocab_size is not None:
        z = cut_vocab(z, vocab_size, vocab_parallel)
    if vocab_parallel and _tp()[1] > 1:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return -vocab_parallel_cross_entropy(z, targets)
    return torch.log_softmax(z, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _chunk_logprobs(flat, targets, rows, temperature: float, vocab_size: Optional[int],
                    vocab_parallel: bool, with_entropy: bool = False):
    z = flat.index_select(0, rows).float()  # a fresh tensor: edited in place below
    if temperature != 1.0:
        z.div_(temperature)
    if vocab_size is not None:
        if not vocab_parallel:
            z = z[..., :vocab_size]
        else:
            rank, _ = _tp()
            start = rank * z.shape[-1]
            if start + z.shape[-1] > vocab_size:
                z[:, max(0, vocab_size - start):] = float("-inf")
    t = targets.index_select(0, rows)
    if vocab_parallel and _tp()[1] > 1:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        entropy = _parallel_entropy(z) if with_entropy else None
        lp = -vocab_parallel_cross_entropy(z, t)  # (subtracts the max from z in place)
        return (lp, entropy) if with_entropy else lp
    s = torch.log_softmax(z, dim=-1)
    lp = s.gather(-1, t[:, None])[:, 0]
    if not with_entropy:
        return lp
    return lp, -(s.exp() * s.masked_fill(torch.isinf(s), 0.0)).sum(-1)


def _parallel_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) whose last dimension is this rank's vocab-parallel shard (padded
    columns -inf): H = log Z - sum p z, the sums all-reduced over the tensor-parallel group
    (autograd-aware: each rank's backward gets its own shard's gradient)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    top = z.detach().max(dim=-1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    e = torch.exp(z - top[:, None])
    total = reduce_from_tensor_model_parallel_region(e.sum(-1))
    p = e / total[:, None]
    pz = reduce_from_tensor_model_parallel_region((p * z.masked_fill(torch.isinf(z), 0.0)).sum(-1))
    return torch.log(total) + top - pz


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: Optional[torch.Tensor] = None,
                      *, temperature: float = 1.0, vocab_size: Optional[int] = None,
                      vocab_parallel: bool = False, chunk_tokens: int = 1024,
                      with_entropy: bool = False):
    """token_logprobs of the tokens `rows` of the flattened [..., V] logits (all when None),
    [len(rows)] in fp32, over chunks of `chunk_tokens`, each checkpointed when the logits need
    a gradient: the fp32 copies (and the cross-entropy's softmax) exist one chunk at a time,
    so memory beyond the logits is chunk x vocabulary, whatever the sequence length.
    `with_entropy`: (log-probs, entropies of softmax(logits / T)), from the same softmax."""
    flat = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1).to(flat.device)
    if rows is None:
        rows = torch.arange(flat.shape[0], device=flat.device)
    grad = flat.requires_grad and torch.is_grad_enabled()
    args = (temperature, vocab_size, vocab_parallel, with_entropy)
    step = max(1, chunk_tokens)
    out = []
    for i in range(0, rows.numel(), step):
        r = rows[i:i + step]
        if grad:
            out.append(checkpoint(_chunk_logprobs, flat, targets, r, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(flat, targets, r, *args))
    if not with_entropy:
        return torch.cat(out) if out else flat.new_zeros(0, dtype=torch.float32)
    if not out:
        empty = flat.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([lp for lp, _ in out]), torch.cat([h for _, h in out])


# ------------------------------------------------------------------------------ divergences
def divergence(s: torch.Tensor, t: torch.Tensor, opd_loss: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence of log-probs `s` (student) and `t` (teacher), [..., V] -> [...]."""
    if opd_loss == "jsd" and beta <= 0.0:
        opd_loss = "fkl"
    elif opd_loss == "jsd" and beta >= 1.0:
        opd_loss = "rkl"
    if opd_loss == "rkl":
        return (s.exp() * (s - t)).sum(-1)
    if opd_loss == "fkl":
        return (t.exp() * (t - s)).sum(-1)
    if opd_loss == "jsd":
        m = torch.logsumexp(torch.stack([s + math.log(1.0 - beta), t + math.log(beta)]), dim=0)
        kl_teacher = (t.exp() * (t - m)).sum(-1)
        kl_student = (s.exp() * (s - m)).sum(-1)
        return beta * kl_teacher + (1.0 - beta) * kl_student
    raise ValueError(f"unknown divergence {opd_loss!r}; expected one of {', '.join(FULL_VOCAB)}")


def _chunk_divergence(zs, zt, rows, opd_loss: str, beta: float, temperature: float, vocab_size: int,
                      student_parallel: bool, teacher_parallel: bool) -> torch.Tensor:
    if rows is not None:
        zs, zt = zs.index_select(0, rows), zt.index_select(0, rows)
    if student_parallel:
        zs = gather_vocab(zs)
    if teacher_parallel:
        zt = gather_vocab(zt)
    s = torch.log_softmax(zs[..., :vocab_size].float() / temperature, dim=-1)
    t = torch.log_softmax(zt[..., :vocab_size].float() / temperature, dim=-1)
    return divergence(s, t, opd_loss, beta)


def full_vocab_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                          opd_loss: str, beta: float = 0.5, temperature: float = 1.0,
                          vocab_size: int, rows: Optional[torch.Tensor] = None,
                          student_parallel: bool = False, teacher_parallel: bool = False,
                          chunk_tokens: int = 1024) -> torch.Tensor:
    """Per-token divergence of [N, V_s] student and [N, V_t] teacher logits (of the tokens
    `rows`, all N when None) in fp32, over chunks of `chunk_tokens` tokens, each checkpointed
    when the student needs a gradient (its fp32 intermediates live one chunk at a time).
    `*_parallel`: that side's last dimension is this rank's tensor-parallel vocab shard."""
    teacher_logits = teacher_logits.detach()
    grad = student_logits.requires_grad and torch.is_grad_enabled()
    args = (opd_loss, beta, temperature, vocab_size, student_parallel, teacher_parallel)
    total = student_logits.shape[0] if rows is None else rows.numel()
    step = max(1, chunk_tokens)
    out = []
    for i in range(0, total, step):
        if rows is None:
            inputs = (student_logits[i:i + step], teacher_logits[i:i + step], None)
        else:
            inputs = (student_logits, teacher_logits, rows[i:i + step])
        if grad:
            out.append(checkpoint(_chunk_divergence, *inputs, *args, use_reentrant=False))
        else:
            out.append(_chunk_divergence(*inputs, *args))
    if not out:
        return student_logits.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


# ------------------------------------------------------------------------------ sampled-rkl
@dataclass(frozen=True)
class PolicyLoss:
    """slime's clipped surrogate for sampled-rkl (flags of the same names)."""

    kl_coef: float = 1.0  # --opd-kl-coef
    eps_clip: float = 0.2  # --eps-clip
    eps_clip_high: Optional[float] = None  # --eps-clip-high (None: eps_clip)
    use_tis: bool = False  # --use-tis
    tis_clip: float = 2.0  # --tis-clip
    tis_clip_low: float = 0.0  # --tis-clip-low

    def per_token(self, logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                  old_logprobs: Optional[torch.Tensor] = None,
                  rollout_logprobs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """Per-token loss (module docstring) and its diagnostics {clipfrac, ratio, tis}, per
        token. `old_logprobs`: the policy's at the start of the rollout (None: one optimizer
        step per rollout, sg(logprobs)); `rollout_logprobs`: the sampler's (for --use-tis)."""
        s = logprobs.float()
        old = s.detach() if old_logprobs is None else old_logprobs.float()
        advantage = -self.kl_coef * (old - teacher_logprobs.float())
        ratio = torch.exp(s - old)
        high = self.eps_clip if self.eps_clip_high is None else self.eps_clip_high
        plain = -advantage * ratio
        clipped = -advantage * ratio.clamp(1.0 - self.eps_clip, 1.0 + high)
        loss = torch.maximum(plain, clipped)
        info = {"clipfrac": (clipped > plain).float(), "ratio": ratio.detach()}
        if self.use_tis:
            if rollout_logprobs is None:
                raise ValueError("--use-tis needs the sampling log-probs of the rollout")
            tis = torch.exp(old - rollout_logprobs.float())
            weight = tis.clamp(self.tis_clip_low, self.tis_clip)
            loss = loss * weight
            info["tis"] = tis
            info["tis_clipfrac"] = (weight != tis).float()
        return loss, info


def sampled_rkl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                kl_coef: float = 1.0) -> torch.Tensor:
    """Per-token loss with one optimizer step per rollout (ratio 1, no clip, no TIS): value
    c (s(y) - t(y)), gradient c (s(y) - t(y)) grad s(y) (the module docstring)."""
    return PolicyLoss(kl_coef=kl_coef).per_token(student_logprobs, teacher_logprobs)[0]


# ------------------------------------------------------------------------------ the reduction
def response_weights(response_tokens: torch.Tensor, total_tokens: float, total_responses: float,
                     reduction: str) -> torch.Tensor:
    """Per-token weight of each response's tokens (module docstring, "Reduction"), given its
    response-token count and the global batch's token and response totals (fixed once per
    step, whatever the micro-batching): the trainer's token mean of weight x loss is then the
    chosen reduction."""
    counts = response_tokens.double()
    if reduction == "token-mean":
        return torch.ones_like(counts, dtype=torch.float32)
    if reduction == "sample-mean":
        return (total_tokens / (total_responses * counts.clamp(min=1))).float()
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
