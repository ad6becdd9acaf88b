"""Communication primitives of every parallel layout (``mappings``): Megatron-style autograd Functions with
their backward duals, and the reductions that carry no gradient. Depends on torch only.
"""
