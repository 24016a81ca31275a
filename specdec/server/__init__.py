"""The OpenAI-compatible server (`specdec serve`): app.py builds the FastAPI app over one LLM, loop.py is the thread
that drives its engine, protocol.py parses requests, responses.py shapes replies, chat.py renders chat templates,
metrics.py serves Prometheus metrics, background.py runs a server on a thread (tests, `bench serve`)."""
