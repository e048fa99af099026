"""Command-line tools of focus-detr (``python3 -m focus_detr.tools.<name>``)."""
