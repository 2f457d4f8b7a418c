"""fasttune profile: traces, named regions, op timing."""
