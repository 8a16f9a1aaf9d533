"""Alphabet Set Multipliers (ASM): alphabet-constrained weights, bit-exact shift-add emulation and an exact fast
path (spec asm.md). ``lrkern.asm.alphabet`` holds the alphabet tables; the ops are ``torch.ops.lrkern.asm_*``."""
