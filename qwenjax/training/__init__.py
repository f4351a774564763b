"""Fine-tuning: chat data packed into fixed-shape rows, and LoRA training with optax on the inference modules."""
