"""Benchmarks behind ``pagedserve bench``: throughput, serving, memory and scheduler.

The only modules of scheduler_svc that import torch, transformers or gpu_worker (lazily, when run).
"""
