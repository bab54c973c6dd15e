"""The Ray Serve application for the GPT-2 variants (see serving/app.py)."""
