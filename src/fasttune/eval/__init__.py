"""Generation, evaluation and the LLM judge."""
