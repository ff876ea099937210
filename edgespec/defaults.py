"""Defaults that several modules share, each defined once.

This module imports nothing, so the CLI, the API and the runtimes can all read it without slowing
`import edgespec`.
"""

#: context size in tokens (prompt + answer), as llama-cpp-python's examples use
N_CTX = 4096
#: draft tokens per step for a fixed drafter (`--draft-max`, `Engine(draft_max=)`, profiles' k)
DRAFT_MAX = 4
#: the longest draft any drafter may propose, and the built-in profiles' k_max
K_LIMIT = 64
