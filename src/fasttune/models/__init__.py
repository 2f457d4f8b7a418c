"""The model math, its weights and tokenizer, LoRA/QLoRA and the merge."""
