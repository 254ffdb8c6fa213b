"""One-off builders users never import (run from the repository root, e.g.
`python -m tools.build_corpora`); outside the installed package."""
