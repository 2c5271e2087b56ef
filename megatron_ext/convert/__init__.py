"""The conversion product: Hugging Face <-> Megatron-Core checkpoints, upcycling, tokenizers.

Four conversions, each a tool in tools/ that is a thin command line over this package:

  import    HF `qwen3_moe` / `qwen3` directory -> Megatron checkpoint   import_hf_to_mcore.py
  upcycle   dense HF `qwen3` -> Marco MoE Megatron checkpoint           upcycle_hf_to_mcore.py
  export    Megatron checkpoint (any TP/PP/EP/DP layout) -> HF          export_mcore_to_hf.py
  tokenizer the checkpoint's tokenizer -> HF tokenizer files            (part of the export)

Design:
  * One weight mapping (`mapping`), used in both directions, so an import followed by an
    export is bit-identical. Names, the qkv interleaving and the [gate; up] fc1 layout live
    there and nowhere else; so do the checkpoint shapes an architecture implies on each side.
  * Streaming, never the whole model in memory: checkpoints of 8B+ parameters are converted
    on machines with a few GiB. Megatron checkpoints are written by Megatron's own
    `dist_checkpointing.save` with a DCP planner that asks a *producer* for each chunk when
    the writer reaches it (`streaming`); they are read one layer's chunk at a time with DCP
    (`mcore_reader`). HF safetensors are read header-first and written with headers laid out
    up front (`safetensors_io`).
  * Check everything before writing anything: the HF config against Marco's spec, every
    tensor's name and shape, the checkpoint's files (`checkpointing.verify_checkpoint`, the
    trainer's own check); a failure is one `ConversionError` / `CheckpointError` line naming
    the flag, file or tensor (`megatron_ext.errors`). Tools write
    into a temporary sibling directory renamed at the end (`megatron_ext.cli.atomic_directory`).
  * The Megatron side is the Marco model as `megatron_ext.model.build_meta_model` builds it
    (the target's keys, shapes and chunks come from its `sharded_state_dict()` on the meta
    device), so converted checkpoints load at any parallel layout like trained ones.

Modules:
  mapping           HF <-> Megatron names, AttentionLayout, qkv and gate/up transforms,
                    per-layer and whole-model conversions, Megatron layer/global shapes,
                    expected HF shapes, `chunk_of`
  hf_config         config.json <-> preset fields (`read_hf_config`,
                    `preset_fields_from_hf_config`, `hf_config_dict`, `hf_tokenizer_info`)
  safetensors_io    `HFSafetensors` (lazy reader), `SafetensorsWriter` (streaming shards)
  mcore_reader      `McoreCheckpointReader` (checked files, names, shapes and values),
                    `export_tensors`
  streaming         `save_streaming` (a Megatron checkpoint from a chunk producer),
                    `HFCheckpointSource` (the import's producer)
  upcycling         the Marco upcycling math and `UpcycledCheckpoint` (the upcycler's producer)
  tokenizer_export  HF tokenizer copy, SentencePiece BPE -> `tokenizer.json`

Importing the package imports nothing; `streaming` imports Megatron-Core (seconds), the other
modules only torch (and transformers / safetensors / tokenizers where they use them).
"""
