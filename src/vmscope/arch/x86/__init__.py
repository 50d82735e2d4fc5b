"""x86-64 platform: boot state, memory map, CPUID, firmware tables."""
