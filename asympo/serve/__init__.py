"""`asympo serve`: an OpenAI-compatible HTTP server around the in-process engine, with a weight-reload
endpoint so a learner (here or on another machine) can push each new policy version.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/weights, GET /health.
HTTP is Starlette on uvicorn (the `serve` extra, see server.py); concurrent requests share one continuously
batched engine thread (see batcher.py).
"""
