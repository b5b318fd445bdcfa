"""Conversions between dit_fast/official DiT weights and other libraries' layouts.

`dit_fast.interop.diffusers`: Hugging Face diffusers' `DiTTransformer2DModel` (imported lazily;
diffusers itself is only needed for the *_model helpers).
"""
