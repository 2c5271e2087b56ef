#!/usr/bin/env python3
"""Benchmark: generation tokens/s, ours (megatron_ext.inference.generation) vs transformers.

    python bench/bench_generate.py          # tiny, tiny with long sequences, a bigger CPU shape
    python bench/bench_generate.py --cases tiny --new-tokens 16 --rounds 1   # quick look

Per case: a random `Qwen3MoeForCausalLM` with exactly the config our export writes goes through
tools/import_hf_to_mcore.py (-> our checkpoint) and tools/export_mcore_to_hf.py (-> the exported
HF model), so both sides run the same weights. Same prompts (random ids, lengths from half to
all of --prompt-len, one batch, left-padded on both sides), greedy, no stop token, exactly
--new-tokens new tokens per prompt. Ours: `generate` (Megatron's static KV cache) with each
expert backend; HF: `model.generate` (its dynamic KV cache) with its default experts
implementation; both under torch.inference_mode, as tools/generate.py runs. Rounds alternate
between the stacks so machine noise hits all of them; the median round counts. tokens/s = batch
x new tokens / wall time of the whole call (prefill included); CPU seconds = the process's CPU
time for the call (all threads), the steadier figure on a shared machine; "vs HF (CPU time,
paired)" = the median over rounds of HF's CPU time / ours in the same round, which cancels the
machine's slow spells (they hit both sides of a round). The last column says whether the greedy
tokens equal HF's, row for row.
On a GPU both sides run there in bf16 (plus a TransformerEngine grouped-GEMM row where TE is
installed); on a CPU in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import environment_lines  # noqa: E402

# name: (preset overrides of `tiny`, batch, longest prompt, new tokens). cpu-medium is a
# CPU-feasible shape between `tiny` and the real models: 8 layers, hidden 512, 32 experts x 256
# top-4 (fine-grained like Marco), 32k vocabulary: 0.13B parameters, 0.04B active.
MEDIUM = dict(num_layers=8, hidden_size=512, num_attention_heads=8, num_query_groups=4,
              kv_channels=64, ffn_hidden_size=1024, num_experts=32, moe_ffn_hidden_size=256,
              moe_router_topk=4, vocab_size=32768)
CASES = {
    "tiny": (dict(), 8, 64, 64),
    "tiny-long": (dict(), 4, 512, 256),
    "cpu-medium": (MEDIUM, 8, 64, 64),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--batch", type=int, help="prompts per batch (default: the case's)")
    p.add_argument("--prompt-len", type=int, help="longest prompt in tokens (default: the case's)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default: the case's)")
    p.add_argument("--rounds", type=int, default=3)
    return p


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset_for(case: str):
    from megatron_ext.presets import get_preset

    return dataclasses.replace(get_preset("tiny"), name=f"bench-{case}", **CASES[case][0])


def make_models(preset, workdir: str) -> tuple[str, str]:
    """Random HF weights -> our checkpoint -> exported HF directory; returns both paths."""
    import contextlib
    import io

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_ext.convert.hf_config import hf_config_dict

    src, ckpt, hf = (os.path.join(workdir, n) for n in ("src", "ckpt", "hf"))
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**hf_config_dict(preset))).save_pretrained(src)
    with contextlib.redirect_stdout(io.StringIO()):
        assert _tool("import_hf_to_mcore").main(["--hf-dir", src, "--save", ckpt]) == 0
        assert _tool("export_mcore_to_hf").main(["--load", ckpt, "--out", hf]) == 0
    return ckpt, hf


def make_prompts(batch: int, longest: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, longest // 2), longest + 1, (batch,), generator=g).tolist()
    lengths[0] = longest
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def device_and_dtype():
    """The GPU in bf16 where there is one (the GPU figures), else the CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


class Ours:
    def __init__(self, ckpt: str, backend: str, new_tokens: int):
        from megatron_ext.inference.generation import SamplingParams
        from megatron_ext.inference.loading import load_model_from_checkpoint

        self.model, _ = load_model_from_checkpoint(ckpt, expert_backend=backend,
                                                   params_dtype=device_and_dtype()[1])
        self.params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def __call__(self, prompts) -> list[list[int]]:
        from megatron_ext.inference.generation import generate

        return [g.output_ids for g in generate(self.model, prompts, self.params, inference_mode=True)]


class HF:
    def __init__(self, directory: str, new_tokens: int):
        from transformers import AutoModelForCausalLM

        self.device, dtype = device_and_dtype()
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(self.device).eval()
        self.model.generation_config.eos_token_id = None  # exactly new_tokens, as ours
        self.new_tokens = new_tokens
        self.implementation = getattr(self.model.config, "_experts_implementation", None) or "eager"

    def __call__(self, prompts) -> list[list[int]]:
        import torch

        longest = max(map(len, prompts))
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = torch.tensor(p)
            mask[r, longest - len(p):] = 1
        # Without the CPU shims' TorchFunctionMode (megatron_ext/cpu_compat.py), which this
        # process installs for Megatron: HF runs as it would in a process of its own.
        from megatron_ext.inference.generation import _without_cpu_device_mode

        with torch.inference_mode(), _without_cpu_device_mode():  # as ours (tools/generate.py)
            ids, mask = ids.to(self.device), mask.to(self.device)
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=self.new_tokens, pad_token_id=0)
        return out[:, longest:].tolist()


def bench_case(case: str, args) -> list[str]:
    import torch

    from megatron_ext.layer_spec import te_usable

    preset = preset_for(case)
    _, batch, prompt_len, new_tokens = CASES[case]
    batch, prompt_len = args.batch or batch, args.prompt_len or prompt_len
    new_tokens = args.new_tokens or new_tokens
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as workdir:
        ckpt, hf_dir = make_models(preset, workdir)
        stacks = {
            "ours: Megatron-Core, SequentialMLP": Ours(ckpt, "sequential", new_tokens),
            "ours: Megatron-Core, torch._grouped_mm experts": Ours(ckpt, "torch-grouped", new_tokens),
        }
        if te_usable():
            stacks["ours: Megatron-Core, TE grouped GEMM"] = Ours(ckpt, "te", new_tokens)
        hf = HF(hf_dir, new_tokens)
        stacks[f"HF Qwen3MoeForCausalLM.generate, experts {hf.implementation}"] = hf  # last
    prompts = make_prompts(batch, prompt_len, preset.vocab_size)
    times = {name: [] for name in stacks}
    cpu = {name: [] for name in stacks}
    outputs = {}
    for name, run in stacks.items():  # warm-up (allocations, first-call paths)
        outputs[name] = run(prompts)
    for _ in range(args.rounds):
        for name, run in stacks.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run(prompts)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    hf_name = list(stacks)[-1]
    device, dtype = device_and_dtype()
    where = (f"bf16 on {torch.cuda.get_device_name()}" if device.type == "cuda"
             else f"fp32 on CPU, {torch.get_num_threads()} threads")
    tokens = batch * new_tokens
    lines = [f"# {case}: {preset.num_layers} layers, hidden {preset.hidden_size}, "
             f"{preset.num_experts} experts x {preset.moe_ffn_hidden_size} top-{preset.moe_router_topk}, "
             f"vocab {preset.vocab_size}; batch {batch}, prompts {min(map(len, prompts))}-"
             f"{max(map(len, prompts))} tokens, {new_tokens} new tokens each, greedy, {where}; "
             f"median of {args.rounds}",
             "| stack | seconds | tokens/s | vs HF | CPU seconds | vs HF (CPU time, paired) "
             "| greedy tokens = HF's |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    cpu_s = {name: statistics.median(t) for name, t in cpu.items()}
    # Per round, HF's CPU time over this stack's in the same round; the median of those: a
    # slow spell of the machine hits both sides of a round, so it cancels out of the ratio.
    paired = {name: statistics.median(h / o for h, o in zip(cpu[hf_name], cpu[name])) for name in stacks}
    for name in stacks:
        same = sum(a == b for a, b in zip(outputs[name], outputs[hf_name]))
        lines.append(f"| {name} | {statistics.median(times[name]):.2f} | {rate[name]:,.0f} | "
                     f"{rate[name] / rate[hf_name]:.2f}x | {cpu_s[name]:.2f} | "
                     f"{paired[name]:.2f}x | {same}/{batch} rows |")
    best = max((n for n in stacks if n.startswith("ours")), key=paired.get)
    target = "GPU target: at least 1.00x" if device.type == "cuda" else "issue target: at least 1.00x on CPU"
    lines.append(f"# ours (faster backend) vs HF: {rate[best] / rate[hf_name]:.2f}x the tokens/s, "
                 f"{paired[best]:.2f}x by CPU time, paired rounds ({target})")
    return lines


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"error: --cases: unknown case {unknown[0]!r}; expected {', '.join(CASES)}", file=sys.stderr)
        return 2
    from megatron_ext import parallel

    print("\n".join(environment_lines()), flush=True)
    with parallel.single_process(0):
        for case in cases:
            print("\n" + "\n".join(bench_case(case, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
