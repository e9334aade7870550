"""The JTrack-compatible upload server (Bottle); see :func:`server.app.create_app`."""
