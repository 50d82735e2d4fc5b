"""vmscope.loader."""
