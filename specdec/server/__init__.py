"""The OpenAI-compatible server (`specdec serve`): app.py builds the FastAPI app over one LLM, loop.py is the thread
that drives its engine, choices.py runs a request's choices in it, protocol.py parses requests, limits.py refuses
what is too large to serve, responses.py shapes replies, chat.py renders chat templates, metrics.py serves
Prometheus metrics, errors.py the error bodies, background.py runs uvicorn (on a thread for tests and `bench serve`),
loadgen.py is `bench serve`'s load generator."""
