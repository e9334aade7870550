"""WSGI entry point for gunicorn: ``gunicorn server.wsgi:app`` with ``WORKBENCH_HOME`` set."""

from server.app import create_app
from workbench.config import load_config

app = create_app(load_config())
