"""`edgespec serve`: the OpenAI-compatible HTTP app, its request queue and the request and
response formats."""
