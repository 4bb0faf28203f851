"""One module per CLI command: parse flags, call the library, render with rich. No logic here
that a test of the library could not reach."""
