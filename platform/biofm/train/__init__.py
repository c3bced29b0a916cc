"""Ray Train loops, checkpoint I/O and metrics."""
