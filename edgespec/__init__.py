"""edgespec: speculative decoding for local LLMs on laptops and desktops.

A small draft model (or a free n-gram lookup) proposes tokens; the target model checks them all in
one forward pass; the output is exactly what the target alone would produce.

Importing this package is cheap: llama.cpp and numpy-heavy modules load when first used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
