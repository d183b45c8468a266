"""Fused implementations: Triton window attention, compiled (C++/CUDA) window movement and patch merge."""
