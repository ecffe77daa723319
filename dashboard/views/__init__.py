"""One module per dashboard page, each with a ``render()`` that draws the page (see ``dashboard.app.PAGES``).

Why ``views`` and not ``pages``: a ``pages/`` folder beside the entry script switches Streamlit (1.67) into its
legacy multipage mode until the entry script itself has run once in the server process, so a first visit to a
deep link such as ``/map`` executed ``pages/map.py`` as a script and showed a blank page with a file-name menu.
"""
