"""Data, not code: the Jinja templates (`templates/`) and static JS/CSS (`static/`) of DreamStream's pages.

This folder is where the studio, viewer and OBS overlay pages are edited. It is a package only so that
a wheel ships it and `service.pages` finds it with `importlib.resources.files("overlays")`, the same
way from a checkout, an editable install or a plain `pip install`. Files added under `templates/` or
`static/` are packaged by pyproject.toml's `[tool.setuptools.package-data]`.
"""
