"""Runnable sample bots, each with its tests: ``ivr``, ``meeting``, ``notifier``.

Shipped with callbot so ``callbot sample NAME DIR`` can write one out to start from.
"""
