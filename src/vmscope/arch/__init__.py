"""Architecture support."""
