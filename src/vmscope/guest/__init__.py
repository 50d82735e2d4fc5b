"""vmscope.guest."""
