"""Stack unwinders chosen per code region: ORC (kernels), DWARF CFI (ELF images), frame pointers."""
