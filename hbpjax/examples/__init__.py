"""Models, data and training loops for hbpjax's benchmarks, demo and notebooks.

Not part of the library proper: everything here uses only hbpjax's public API (``hbpjax``,
``hbpjax.nnx``) and Flax/optax, like user code would. Its modules import Flax, optax and (for
plots and progress bars) the ``examples`` extra: ``pip install 'hbpjax[examples]'``, then
``from hbpjax.examples import data, models, train``. ``import hbpjax`` alone never loads them.
"""
