"""The run: config, set-up, the step, the loop, checkpoints, parallelism, the output folder."""
