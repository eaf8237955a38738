"""The project's Hydra sweepers, under the ``hydra_plugins`` namespace where Hydra looks for plugins.

Hydra 1.3 instantiates a sweeper only if its class lives in ``hydra_plugins.*`` and was found by
its plugin scan; the implementation lives in :mod:`src.sweeps`.
"""
