"""vmscope.kvm."""
