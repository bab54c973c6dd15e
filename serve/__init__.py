"""The Ray Serve application for the GPT-2 variants (see serve/app.py)."""

import cluster  # noqa: F401  (first: it sets Ray's authentication mode, which Ray reads when it is imported)
