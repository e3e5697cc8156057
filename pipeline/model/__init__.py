"""The GPT model: its modules, its sizes and FLOPs, generation, and which layers tensor parallelism splits."""
