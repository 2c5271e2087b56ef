"""Evaluation: lm-evaluation-harness on Megatron checkpoints, suites, summaries, decontamination.

    lm.py          `MarcoLM`, an lm-eval model (registered as "marco") backed by our Megatron
                   model loaded from a checkpoint saved at any layout; the same requests, the
                   same tokenisation and the same arithmetic as lm-eval's `hf` model, so both
                   give equal scores on an exported checkpoint (tests/test_evaluate.py)
    tasks.py       offline tasks made from the bundled data (lm-eval YAML with local JSON files)
    suites.py      suite files (configs/eval/*.yaml): groups of real lm-eval tasks with few-shot
                   counts and languages
    summary.py     per-group and per-language markdown tables, bar charts, the settings record
    decontam.py    n-gram overlap on token ids between Megatron indexed training data and
                   evaluation examples; per-example and per-task reports; clean subsets

tools/evaluate.py and tools/decontaminate.py are the command lines; docs/evaluation.md the guide.
Importing this package does not import lm-eval or Megatron; its modules do.
"""
