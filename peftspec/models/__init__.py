"""Models that ship with peftspec (no download needed)."""
