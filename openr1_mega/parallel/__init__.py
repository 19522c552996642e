"""Process groups (Megatron parallel_state) and the CPU/gloo compatibility layer."""
