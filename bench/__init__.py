"""Benchmarks of the fused snclr ops against their references (DESIGN section 6)."""
