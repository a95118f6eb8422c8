"""Kernel benchmarks (``python -m kernels.bench``) and the GPU experiments behind kernels/NOTES.md
(``python -m kernels.bench.<name>``); CUDA only."""
