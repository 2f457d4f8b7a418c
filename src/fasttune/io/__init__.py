"""Shared file handling: bounded reads of model folders, the JSONL reader, atomic writes."""
