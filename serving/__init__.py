"""Serving a model over HTTP: the batched decoding engine (engine.py), the OpenAI-compatible API (api.py) and its playground page."""
