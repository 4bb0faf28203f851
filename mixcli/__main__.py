from .cli import entry  # cli.py makes Ctrl-C during its own imports a quiet exit 130

entry()
