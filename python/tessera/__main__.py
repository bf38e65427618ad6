"""`python -m tessera`: usage and options; `python -m tessera build` builds the torch adaptor."""
import sys

from tessera import _main

sys.exit(_main(sys.argv[1:]))
