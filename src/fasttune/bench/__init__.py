"""fasttune bench: the end-to-end benchmark against the Hugging Face baseline."""
