"""tests/test_adaln.py's imports, until it takes them from op_helpers.py (then delete this file)."""

from op_helpers import BACKEND_DEVICES, HAS_C, require  # noqa: F401

BD_IDS = [p.id for p in BACKEND_DEVICES]
