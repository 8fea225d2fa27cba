"""Campaigns: a manifest of prompts × styles × identities × seeds, planned, stored, run, reported.

``Campaign`` (``studio.batch.campaign``) is the API; ``manifest`` reads the TOML, ``plan`` expands it into
items keyed by their recipe ids, ``store`` is the SQLite campaign store, ``engine`` the coordinator with
its local worker processes, ``ray_engine`` the Ray pool, ``report`` the contact sheets and HTML page,
``export`` the human-readable copies.
"""
