"""`python -m less_cuda ARGS` (and torchrun's `-m less_cuda train ARGS`) is `less-cuda ARGS`."""

from .cli import main

main()
