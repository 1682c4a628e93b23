"""flagtree's command-line tools: `flagtree-opt` (opt.py) and `flagtree` (main.py, with the
`dump`, `backends` and `opt` subcommands); semantics.py is the pass checker behind
`flagtree-opt --check-semantics`."""
