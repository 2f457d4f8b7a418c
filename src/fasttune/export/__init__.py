"""Export formats: Hugging Face, PEFT, merged, GGUF."""
