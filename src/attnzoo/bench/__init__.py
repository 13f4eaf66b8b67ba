"""``attnzoo bench``: efficiency and quality measurements against dense attention in the same run."""
