"""Export to PyTorch, ONNX and INT8: the way from a training run to phones.

- `torch_model`: a PyTorch mirror of every trained module and the sampler; imports no JAX, so it
  runs (and can be copied) into a torch-only project. `load_exported(folder)` loads an export.
- `convert`: JAX parameter trees <-> torch state dicts, strict on names and shapes.
- `python -m microforge_jax.export --workdir RUN --out DIR [--onnx] [--int8]`: a run -> a folder
  (`config.json`, `model.safetensors`, the text encoder, `README.md`, optional ONNX graphs).

Importing this package imports nothing (no jax, no torch).
"""
