"""Fused selective-scan kernels, apart from the models that call them (`models/scan.py` dispatches).

- `native_scan`: a C++ CPU kernel (`native_scan.cc`, compiled on first use), through the XLA FFI.
- `pallas_scan`: a Pallas kernel, Triton on GPU (the Pallas interpreter on CPU, for tests).

They import nothing of ours: the models import them, never the other way round.
"""
