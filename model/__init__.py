"""RET v2.1 and its checkpoints: the model, the byte tokenizer, generation."""
