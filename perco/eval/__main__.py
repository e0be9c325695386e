"""``python -m perco.eval`` (e.g. under ``accelerate launch``) is ``perco-eval``."""

from .cli import main

main()
