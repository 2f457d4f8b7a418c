"""Memory and time estimates before a run."""
