"""vmscope.vmm."""
