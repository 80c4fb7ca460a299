"""Ray workers."""
