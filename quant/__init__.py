"""Offline side of mixcli: the converted format, the quantizers and the converter."""
