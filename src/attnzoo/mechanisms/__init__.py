"""Mechanisms, one file per paper, in a folder per CATALOG family.

Every module below this package is imported when the registry is first read
(:func:`attnzoo.registry.mechanisms`); each registers its :class:`~attnzoo.registry.Mechanism` record.
"""
