"""The browser page: Mesa's SolaraViz over a ``VizModel``.

``python -m abm.viz [SCENARIO]`` serves it (``server``); ``solara run abm/viz/app.py``
is the same page, Mesa's way. ``model`` holds the page's model and its controls,
``layout`` the node positions, ``draw`` the matplotlib pictures and ``components``
the Solara widgets. Nothing here is imported by a command-line run.
"""
