"""Host-side facilities that are not KVM: Linux perf events on vmscope's own threads."""
