"""Fused scoring/eviction kernels: Triton for GPUs and the Inductor path for CPUs."""
