"""Small applications for ``wsfleet serve --app`` (tests/test_serve_app.py)."""
