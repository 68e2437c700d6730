"""Models, data and training loops for hbpjax's benchmarks, demo and notebooks.

Not part of the library: everything here uses only hbpjax's public API (``hbpjax``,
``hbpjax.nnx``) and Flax/optax, like user code would.
"""
