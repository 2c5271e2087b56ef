"""HF <-> Megatron conversion (placeholder, filled in the next commit)."""
