"""`tessera_torch`, the former name of the `tessera` package, kept as an alias:
`import tessera_torch` gives the same module object, `python -m tessera_torch` the same
command."""
import sys

import tessera

if __name__ == "__main__":
    sys.exit(tessera._main(sys.argv[1:]))
sys.modules[__name__] = tessera
