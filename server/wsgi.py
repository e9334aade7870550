"""WSGI entry point for gunicorn: ``gunicorn workbench_server.wsgi:app`` with ``WORKBENCH_HOME`` set."""

from workbench_server.app import create_app

from workbench.config import load_config

app = create_app(load_config())
