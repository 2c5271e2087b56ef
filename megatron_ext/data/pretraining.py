"""The data the trainer reads: stages of Megatron-Core blended datasets, addressed by step.

Every stage (one for --data-path, --mock-data and the default sample corpus; one per stage of
a --curriculum file) is a dataset built by Megatron-Core's BlendedMegatronDatasetBuilder with
exactly the samples that stage needs. Global step s of stage k reads samples
[(s - first_step_k) * gbs, (s - first_step_k + 1) * gbs) of it, and data-parallel rank r takes
rows [m*mbs*dp + r*mbs, ... + mbs) for micro-batch m, the layout of Megatron-LM's pretraining
sampler. Nothing depends on what was read before: a batch is a pure function of (step, rank),
so a resumed run reads exactly what an uninterrupted one would.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_ext.data.args import DataOptions, check_data_options, parse_data_path, parse_split
from megatron_ext.data.curriculum import SAMPLE_ROOT, load_curriculum
from megatron_ext.data.errors import DataConfigError
from megatron_ext.data.indexed import check_indexed_dataset
from megatron_ext.data.sample import default_cache_root, once_per_node, prepare_sample_corpus
from megatron_ext.task import TrainData

log = logging.getLogger(__name__)
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class StagePlan:
    name: str
    start_step: int
    end_step: int  # exclusive
    sources: list[str]
    prefixes: list[str]
    weights: list[float]
    languages: tuple[str, ...] = ()
    dataset: object = None
    counts: np.ndarray | None = field(default=None, repr=False)  # samples per source, whole stage


@dataclass
class ValidationPlan:
    prefix: str | None  # None: mock data
    split: str | None  # the --split of a --data-path prefix; None: the whole prefix


def _dist():
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _split_docs(num_docs: int, fractions: list[float]) -> list[int]:
    """Documents per split, with Megatron-Core's rounding of split boundaries."""
    bounds = np.concatenate([[0], np.cumsum(fractions)])
    ends = [int(round(b * num_docs)) for b in bounds]
    return [ends[i + 1] - ends[i] for i in range(3)]


def _source_names(prefixes: list[str]) -> list[str]:
    names = [re.sub(r"_text_document$", "", os.path.basename(p)) for p in prefixes]
    return names if len(set(names)) == len(names) else list(prefixes)


class PretrainingData(TrainData):
    """Train batches by step, stage and consumed-token bookkeeping, validation sets."""

    def __init__(self, stages: list[StagePlan], validation: dict[str, ValidationPlan], *,
                 tokenizer, global_batch_size: int, seq_length: int, seed: int,
                 cache_path: str | None, mock: bool = False, curriculum: str | None = None,
                 split: str | None = None):
        self.stages = stages
        self.validation = validation
        self.tokenizer = tokenizer
        self.global_batch_size = global_batch_size
        self.seq_length = seq_length
        self.tokens_per_step = global_batch_size * seq_length
        self.seed = seed
        self.cache_path = cache_path
        self.mock = mock
        self.curriculum = curriculum
        self.split = split  # --split of --data-path; other sources train on whole prefixes
        self._valid_cache: dict[tuple[str, int], object] = {}
        self._last_tally: tuple = (None, 0, None)

    # ------------------------------------------------------------------ building
    def _config(self, seed: int, **kw):
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

        return GPTDatasetConfig(
            random_seed=seed, sequence_length=self.seq_length, tokenizer=self.tokenizer,
            # Megatron's BlendedDataset calls get_rank() on a cache miss: cache only when
            # torch.distributed is up (always the case in the trainer).
            path_to_cache=self.cache_path if _dist() else None,
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, **kw)

    def _build(self, cls, sizes, config):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

        return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()

    def build_stage(self, k: int) -> None:
        from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

        st = self.stages[k]
        n = (st.end_step - st.start_step) * self.global_batch_size
        if self.mock:
            st.dataset = self._build(MockGPTDataset, [n, 0, 0], self._config(self.seed + k))[0]
            return
        split = self.split or "100,0,0"
        # Stage k gets its own seed: a source shared by two stages is reshuffled, not replayed.
        config = self._config(self.seed + k, blend=(st.prefixes, st.weights), split=split)
        try:
            st.dataset = self._build(GPTDataset, [n, 0, 0], config)[0]
        except IndexError as e:  # Megatron's "blend oversamples the contributing datasets"
            raise DataConfigError(f"data stage {k} '{st.name}': {str(e).splitlines()[0]}") from e
        st.counts = np.bincount(np.asarray(st.dataset.dataset_index[:n]), minlength=len(st.sources))

    # ------------------------------------------------------------------ stepping
    def stage_at(self, step: int) -> int:
        for k, st in enumerate(self.stages):
            if st.start_step <= step < st.end_step:
                return k
        raise IndexError(f"step {step} is outside the data plan (steps 0-{self.stages[-1].end_step - 1})")

    def _sample(self, step: int, row: int) -> dict:
        st = self.stages[self.stage_at(step)]
        return st.dataset[(step - st.start_step) * self.global_batch_size + row]

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict]:
        """This rank's micro-batches of global batch `step` (0-based): dicts of
        [micro_batch_size, seq_length] tensors tokens/labels/position_ids (int64), loss_mask (float)."""
        rows = _rank_rows(self.global_batch_size, dp_rank, dp_size, micro_batch_size)
        return [_collate([self._sample(step, r) for r in mb]) for mb in rows]

    def batch_sources(self, step: int) -> list[str]:
        """Source name of each row of global batch `step` (in global-batch order)."""
        k = self.stage_at(step)
        st = self.stages[k]
        if self.mock:
            return ["mock"] * self.global_batch_size
        base = (step - st.start_step) * self.global_batch_size
        ids = st.dataset.dataset_index[base:base + self.global_batch_size]
        return [st.sources[i] for i in ids]

    def consumed_tokens_by_source(self, step: int) -> dict[str, int]:
        """Tokens (sequence positions) read from each source in steps 0..step inclusive."""
        k = self.stage_at(step)
        out: dict[str, int] = {}
        for j, st in enumerate(self.stages[:k + 1]):
            if self.mock:
                samples = (min(step + 1, st.end_step) - st.start_step) * self.global_batch_size
                out["mock"] = out.get("mock", 0) + samples * self.seq_length
                continue
            n = (step + 1 - st.start_step) * self.global_batch_size
            counts = st.counts if j < k else self._tally(st, n)
            for name, c in zip(st.sources, counts):
                out[name] = out.get(name, 0) + int(c) * self.seq_length
        return out

    def _tally(self, st: StagePlan, n: int) -> np.ndarray:
        """Samples per source among the first n of a stage; counts forward from the last call
        (the trainer asks for increasing steps) instead of rescanning a long stage."""
        st0, n0, c0 = self._last_tally
        if st0 is not st or n < n0:
            n0, c0 = 0, np.zeros(len(st.sources), dtype=np.int64)
        c = c0 + np.bincount(np.asarray(st.dataset.dataset_index[n0:n]), minlength=len(st.sources))
        self._last_tally = (st, n, c)
        return c

    # ------------------------------------------------------------------ validation
    def validation_names(self) -> list[str]:
        return list(self.validation)

    def validation_dataset(self, name: str, num_samples: int):
        """The first num_samples samples of validation set `name` (fixed across evaluations)."""
        from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

        if name not in self.validation:
            raise KeyError(f"no validation set {name!r}; have {self.validation_names()}")
        key = (name, num_samples)
        if key not in self._valid_cache:
            plan = self.validation[name]
            sizes = [0, num_samples, 0]
            if plan.prefix is None:
                ds = self._build(MockGPTDataset, sizes, self._config(self.seed))[1]
            elif plan.split is not None:  # the valid part of a --data-path prefix
                ds = self._build(GPTDataset, sizes, self._config(
                    self.seed, blend=([plan.prefix], None), split=plan.split))[1]
            else:  # a whole validation prefix
                ds = self._build(GPTDataset, sizes, self._config(
                    self.seed, blend_per_split=[None, ([plan.prefix], None), None]))[1]
            self._valid_cache[key] = ds
        return self._valid_cache[key]

    def validation_sets(self) -> dict:
        """name -> callable(num_samples) returning that validation dataset."""
        return {name: functools.partial(self.validation_dataset, name) for name in self.validation}

    def validation_micro_batches(self, name: str, num_micro_batches: int, dp_rank: int,
                                 dp_size: int, micro_batch_size: int) -> list[dict]:
        """num_micro_batches micro-batches for this rank; the same samples at every call."""
        per_batch = micro_batch_size * dp_size
        ds = self.validation_dataset(name, num_micro_batches * per_batch)
        return [_collate([ds[m * per_batch + dp_rank * micro_batch_size + j]
                          for j in range(micro_batch_size)]) for m in range(num_micro_batches)]

    def summary(self) -> list[str]:
        lines = []
        for k, st in enumerate(self.stages):
            blend = ", ".join(f"{s} {w / sum(st.weights):.1%}" for s, w in zip(st.sources, st.weights))
            lines.append(f"data stage {k + 1} '{st.name}': steps {st.start_step}-{st.end_step - 1}: {blend}")
        if self.validation:
            lines.append(f"validation sets: {', '.join(self.validation)}")
        return lines


def _rank_rows(gbs: int, dp_rank: int, dp_size: int, mbs: int) -> list[list[int]]:
    if not 0 <= dp_rank < dp_size or gbs % (mbs * dp_size):
        raise ValueError(f"global batch {gbs} does not split into micro-batches of {mbs} x "
                         f"{dp_size} ranks (rank {dp_rank})")
    per = mbs * dp_size
    return [[m * per + dp_rank * mbs + j for j in range(mbs)] for m in range(gbs // per)]


def _collate(samples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS}


# ---------------------------------------------------------------------- planning
def _check(prefix: str, where: str, tokenizer):
    """Validate a prefix; returns its IndexedInfo (sequences: the unit --split divides)."""
    return check_indexed_dataset(prefix, where, tokenizer.vocab_size)


def _sample_corpus(args: DataOptions, tokenizer) -> dict:
    """Prepare the bundled corpus once per node (local rank 0 first, then the others)."""

    return once_per_node(functools.partial(prepare_sample_corpus, args.data_cache_path,
                                           args.tokenizer_model, args.tokenizer_type))


def build_pretraining_data(args: DataOptions, tokenizer, *, global_batch_size: int,
                           seq_length: int, train_iters: int, seed: int) -> PretrainingData:
    """Validate the data options and build every stage that training will reach.

    Data source, in order: --mock-data, --curriculum FILE, --data-path, else the bundled sample
    corpus (natural language mix, per-language validation sets). A --data-path without weights
    (Megatron-LM's bare prefix list) blends by dataset size in tokens. Call on every rank.
    """

    if global_batch_size < 1 or seq_length < 1 or train_iters < 1:
        raise DataConfigError("global batch size, sequence length and train iterations must be >= 1")
    check_data_options(args)
    cache_root = args.data_cache_path or str(default_cache_root())
    common = dict(tokenizer=tokenizer, global_batch_size=global_batch_size, seq_length=seq_length,
                  seed=seed, cache_path=os.path.join(cache_root, "indices"))
    tps = global_batch_size * seq_length
    valid_split = None

    if args.mock_data:
        stages = [StagePlan("mock", 0, train_iters, ["mock"], [], [1.0])]
        data = PretrainingData(stages, {"mock": ValidationPlan(None, None)}, mock=True, **common)
    elif args.curriculum:
        cur = load_curriculum(args.curriculum)
        sample_dir = _sample_corpus(args, tokenizer)["dir"] if cur.data_root == SAMPLE_ROOT else None
        stages = []
        for k, st in enumerate(cur.stages):
            first, end = st.step_range(tps)
            where = f"{cur.path}: stage {k + 1} '{st.name}'"
            if end <= first:
                raise DataConfigError(f"{where}: {st.end_tokens - st.start_tokens} tokens is less "
                                      f"than one global batch ({tps} tokens)")
            names = list(st.weights)
            prefixes = [cur.resolve(cur.sources[s].prefix, sample_dir) for s in names]
            for s, p in zip(names, prefixes):
                _check(p, f"{where}: source '{s}'", tokenizer)  # every stage, reached or not
            if first < train_iters:  # stages past the run are checked but not built
                stages.append(StagePlan(st.name, first, end, names, prefixes,
                                        [st.weights[s] for s in names], st.languages))
        last_end = cur.stages[-1].step_range(tps)[1]
        if train_iters > last_end:
            raise DataConfigError(
                f"{cur.path}: ends at {cur.stages[-1].end_tokens} tokens (step {last_end} at "
                f"{tps} tokens per step) but --train-iters is {train_iters}")
        validation = {}
        for name, prefix in cur.validation.items():
            path = cur.resolve(prefix, sample_dir)
            _check(path, f"{cur.path}: validation '{name}'", tokenizer)
            validation[name] = ValidationPlan(path, None)
        data = PretrainingData(stages, validation, curriculum=cur.path, **common)
    else:
        if args.data_path:
            prefixes, weights = parse_data_path(args.data_path, "--data-path")
            names = _source_names(prefixes)
            fractions = parse_split(args.split)
            valid_split = args.split
            validation, sizes = {}, []
            for name, p in zip(names, prefixes):
                info = _check(p, "--data-path", tokenizer)
                sizes.append(float(info.num_tokens))
                docs = _split_docs(info.num_sequences, fractions)
                for i, split_name in enumerate(("train", "valid", "test")):
                    if fractions[i] > 0 and docs[i] == 0:
                        raise DataConfigError(
                            f"--split {args.split}: {p} has {sum(docs)} documents, none for the "
                            f"{split_name} split (use --valid-data-path or another --split)")
                if fractions[1] > 0 and not args.valid_data_path:
                    validation[name] = ValidationPlan(p, args.split)
            weights = weights or sizes  # bare prefixes: Megatron-LM blends by dataset size
        else:  # the bundled corpus
            info = _sample_corpus(args, tokenizer)
            names = sorted(info["train"])
            prefixes = [info["train"][n] for n in names]
            weights = [float(info["train_tokens"][n]) for n in names]  # natural mix
            validation = {n: ValidationPlan(info["valid"][n], None) for n in sorted(info["valid"])}
        if args.valid_data_path:
            vprefixes, _ = parse_data_path(args.valid_data_path, "--valid-data-path")
            for name, p in zip(_source_names(vprefixes), vprefixes):
                _check(p, "--valid-data-path", tokenizer)
                validation[name] = ValidationPlan(p, None)
        stages = [StagePlan("train", 0, train_iters, names, prefixes, weights)]
        data = PretrainingData(stages, validation, split=valid_split, **common)
    for k in range(len(data.stages)):
        data.build_stage(k)
    for line in data.summary():
        log.info(line)
    return data
