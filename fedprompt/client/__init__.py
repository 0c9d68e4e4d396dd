"""Client-side local update rules."""
