"""Imported by the reliability child process (``run_isolated(imports=[this file])``): registers the planted
mechanisms of planted.py there."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("attnzoo_planted", os.path.join(os.path.dirname(__file__), "planted.py"))
_planted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_planted)
_planted.register_all()
