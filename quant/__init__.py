"""Offline side of mixcli: the converted format, the quantizers and the converters.

It stands alone: ``mixcli`` imports ``quant``, never the reverse (``tests/test_layering.py``), so
what both need (the model config, the errors, the free-memory probe) lives here.
"""
