"""Device models: each implements read/write on offsets and knows nothing of KVM."""
