"""vmscope.cli."""
