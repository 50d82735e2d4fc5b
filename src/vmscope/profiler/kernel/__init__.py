"""What a stock kernel image carries about itself: kallsyms, ORC tables, BTF, and the run-time state
(KASLR slide, current task) read from guest memory with their help."""
