"""The JTrack-compatible upload server (Bottle); see :func:`workbench_server.app.create_app`."""
