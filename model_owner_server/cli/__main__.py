"""`python -m model_owner_server.cli`: the same as `modelowner-server`."""

from model_owner_server.cli import app

app()
