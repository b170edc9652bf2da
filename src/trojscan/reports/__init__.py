"""Reports people read: one self-contained HTML page per scan (:mod:`.scan_page`) and per
campaign (:mod:`.campaign_page`).

A page makes no request of its own: its Content-Security-Policy forbids every external
resource, charts are inline SVG (matplotlib) and images inline PNG (``data:`` URLs), styles
are in the page, and there is no script. Pages are rendered with Jinja2, autoescaped, from
the templates in ``templates/``, and written atomically.
"""
