"""How a model runs on devices: this process's device and process group, collectives with exact gradients
(distributed.py), the transforms applied from outside the model (parallelize.py: float8, activation checkpointing,
torch.compile, FSDP2) and the memory planner that chooses each block's recompute (memory_plan.py). Used by the
embedder, the corpus writer and the trainers alike."""
