"""Checkpoints: HF <-> live Megatron model (hf), Megatron dist checkpoints (dist), offline
streaming conversion (convert), cross-rank gathering (gather), safetensors I/O."""
