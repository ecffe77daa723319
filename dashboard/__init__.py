"""The Mammals Space dashboard: a Streamlit + plotly app over one store (`mammals dashboard STORE`).

``app`` is the entry script (one ``st.Page`` per module of ``views``), ``state`` holds every cached loader, and
``widgets`` the small pieces the pages share (thumbnails, galleries, downloads).  The pages only call the public
functions of ``analysis`` and ``indexer``.
"""
